"""On a CUDA GPU (skipped elsewhere; bench/gpu.sh runs it): the Triton path against the torch
path at the real head and attention shapes: a whole training step (loss, every gradient, the
AdamW update) for both families, and greedy generation with and without CUDA graphs."""
import pytest
import torch

import kernels
from engine.generate import greedy_generate
from engine.optim import AdamW, parameter_groups
from engine.packing import PackedBatch
from models import build_model
from models.config import ModelConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = {   # the real per-layer shapes and vocabularies, two layers
    "qwen2-0.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                   "num_hidden_layers": 2, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "tie_word_embeddings": True, "rope_theta": 1e6},
    "qwen2-1.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                   "num_hidden_layers": 2, "num_attention_heads": 12, "num_key_value_heads": 2,
                   "tie_word_embeddings": True, "rope_theta": 1e6},
    "bloom-1b7": {"model_type": "bloom", "vocab_size": 250880, "hidden_size": 2048, "n_layer": 2, "n_head": 16},
}
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2}     # relative norm error, gradients


def batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    labels = ids.clone()
    labels[cu[:-1].long()] = -100
    return PackedBatch(ids, pos, cu, max(lengths), labels).to("cuda")


def train_step(name, dtype, backend):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(SHAPES[name]), device="cuda", dtype=dtype, seed=0)
    opt = AdamW(parameter_groups(model, 0.01), lr=1e-3)
    b = batch([1, 63, 64, 65, 300, 129], model.config.vocab_size)
    with kernels.backend(backend):
        loss = model.loss(b.input_ids, b.shifted_labels(), b.cu_seqlens, b.position_ids, b.max_seqlen)
        loss.backward()
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}   # fp32 (bf16: accumulated)
        opt.step()
    return loss.float(), grads, {n: p.detach().float() for n, p in model.named_parameters()}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SHAPES)
def test_training_step_triton_equals_torch(name, dtype):
    loss, grads, weights = train_step(name, dtype, "triton")
    ref_loss, ref_grads, ref_weights = train_step(name, dtype, "torch")
    assert torch.isfinite(loss) and rel(loss, ref_loss) < TOLERANCE[dtype] / 10
    worst = max(grads, key=lambda n: rel(grads[n], ref_grads[n]))
    assert rel(grads[worst], ref_grads[worst]) < TOLERANCE[dtype], worst
    assert all(rel(weights[n], ref_weights[n]) < TOLERANCE[dtype] for n in weights)


@pytest.mark.parametrize("name", ["qwen2-0.5b", "bloom-1b7"])
def test_generation_with_cuda_graphs(name):
    config = ModelConfig.from_dict({**SHAPES[name], "vocab_size": 4096})
    model = build_model(config, device="cuda", dtype=torch.float32, seed=0)
    with torch.no_grad():
        for p in model.parameters():            # O(1) logits: greedy outputs that vary
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (1, 7, 40, 130, 300, 12, 64, 3)]
    caps = [30, 5, 64, 17, 40, 1, 50, 33]
    graphs = greedy_generate(model, prompts, caps, [7], cuda_graphs=True)
    eager = greedy_generate(model, prompts, caps, [7], cuda_graphs=False)
    with kernels.backend("torch"):
        reference = greedy_generate(model, prompts, caps, [7], cuda_graphs=False)
    assert graphs == eager == reference
    assert len({tuple(o) for o in reference}) > 1
