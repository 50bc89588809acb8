"""On a CUDA GPU (skipped elsewhere; bench/gpu.sh runs it first): the Triton path against the
torch path at the real per-layer shapes (the registry's configs, two layers), both families.

- Gradients of one forward/backward, every parameter by relative norm per tensor, against the
  torch path in fp32 on the same weights. Not the weights after an AdamW step: with zero-
  initialized biases the first update is about +-lr times the sign of each gradient element, so
  near-zero gradients (BLOOM's key bias has an exact gradient of zero: softmax ignores a shift
  shared by all keys) flip with correct kernels.
- The loss over a few AdamW steps (engine.optim, fp32 masters) on the same batch.
- bf16 bounds: max(a floor, 3x the torch path's own bf16 error on that tensor or step), so a
  quantity that bf16 rounding cannot resolve does not fail the test; the loss floor triples per
  step, as rounding differences compound. CPU emulations (torch bf16 vs fp32, two layers, vocab
  16,384): gradients 0.7-1.4e-2 per tensor (Qwen2-0.5B), 0.2-0.7e-2 (BLOOM-560m); loss after
  0-3 steps at lr 1e-3 within 1e-3 relative (Qwen2), 3e-5 / 2e-3 / 2e-2 / 3e-2 (BLOOM).
- Under the "triton" backend our attention kernel is what runs, also where flash-attn is
  installed (counted launches; flash-attn replaced by a function that fails).
- Greedy generation with and without CUDA graphs equals the torch path.

GPU_TESTS_ON_CPU=1 runs the same checks on the CPU under the Triton interpreter at the tiny
presets' shapes (bench/gpu.sh --dry-run): proof that the test runs, not that the GPU is right.
"""
import contextlib
import dataclasses
import functools
import importlib
import os

import pytest
import torch

from engine.generate import greedy_generate
from engine.optim import AdamW, parameter_groups
from engine.packing import PackedBatch
from kernels.attention import cu_seqlens
from kernels.dispatch import backend
from models import REGISTRY, ModelConfig, build_model, load_model

ATTENTION = importlib.import_module("kernels.attention")   # the module (kernels/__init__ may shadow the name)
ON_CPU = os.environ.get("GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
pytestmark = pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (GPU_TESTS_ON_CPU=1: the interpreter at tiny shapes)")

if ON_CPU:      # the interpreter costs ~1 ms per program: a few tokens, one step, one case per family
    TRAINING = [("tiny-qwen2", torch.bfloat16)]
    GENERATION, LENGTHS, STEPS = ["tiny-bloom"], [1, 4, 9], 1
else:
    TRAINING = [("qwen2-0.5b", torch.float32), ("qwen2-0.5b", torch.bfloat16), ("qwen2-1.5b", torch.bfloat16),
                ("bloom-1b7", torch.bfloat16)]
    GENERATION, LENGTHS, STEPS = ["qwen2-0.5b", "bloom-1b7"], [1, 63, 64, 65, 300, 129], 3  # around 64-token tiles
LR = 1e-3
FLOOR = {torch.float32: 1e-3, torch.bfloat16: 4e-2}       # gradient relative norm (fp32 dots are IEEE)
LOSS_FLOOR = {torch.float32: 1e-3, torch.bfloat16: 5e-3}  # loss before any step, relative
COMPOUNDING = 3.0      # per AdamW step: at lr 1e-3 the trajectories are chaotic (BLOOM-560m layers, torch
                       # bf16 vs fp32: 3e-5, 2e-3, 2e-2, 3e-2 relative after 0-3 steps)
YARDSTICK = 3.0        # x the torch path's own bf16 error (for the loss: its largest up to that step)


def config(name: str, **override) -> ModelConfig:
    """The registry's model cut to two layers (in its raw config too, which a saved config.json holds)."""
    return dataclasses.replace(ModelConfig.from_dict({**REGISTRY[name].config, "num_hidden_layers": 2}, name),
                               **override)


def packed_batch(vocab: int) -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (sum(LENGTHS),), generator=g)
    cu = cu_seqlens(LENGTHS)
    labels = ids.clone()
    labels[cu[:-1].long()] = -100                # a prompt token per sequence, as the packer marks them
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    return PackedBatch(ids, pos, cu, max(LENGTHS), labels).to(DEVICE)


@dataclasses.dataclass
class Run:
    losses: list[float]                  # before each AdamW step and after the last
    grads: dict[str, torch.Tensor]       # fp32, of the first backward
    attention_launches: int


@contextlib.contextmanager
def count_attention_launches():
    """Counts launches of the Triton kernels defined in kernels/attention.py (an instance `run`
    shadows the class's: `kernel[grid](...)` calls self.run)."""
    from triton.runtime.jit import KernelInterface
    launched = [0]
    jitted = [k for k in vars(ATTENTION).values() if isinstance(k, KernelInterface)]

    def counting(run):
        def counted(*args, **kwargs):
            launched[0] += 1
            return run(*args, **kwargs)
        return counted
    for k in jitted:
        k.run = counting(k.run)
    try:
        yield launched
    finally:
        for k in jitted:
            del k.run


def flash_attn_must_not_run(*args, **kwargs):
    raise AssertionError("flash-attn ran although the kernel backend is 'triton'")


@functools.lru_cache(maxsize=None)
def initial_weights(name: str) -> dict:
    """One bf16 initialization per model (on the host), so every run starts from the same weights."""
    return {k: v.cpu() for k, v in build_model(config(name), DEVICE, torch.bfloat16, seed=0).state_dict().items()}


def train(name: str, dtype: torch.dtype, kernel_backend: str, monkeypatch=None) -> Run:
    model = build_model(config(name), DEVICE, dtype, seed=0)
    model.load_state_dict(initial_weights(name))
    opt = AdamW(parameter_groups(model, 0.01), lr=LR)
    b = packed_batch(model.config.vocab_size)
    labels = b.shifted_labels()
    losses, grads = [], {}
    if monkeypatch is not None:
        monkeypatch.setattr(ATTENTION, "flash_attn_varlen_func", flash_attn_must_not_run, raising=False)
    with backend(kernel_backend), count_attention_launches() as launched:
        for step in range(STEPS + 1):
            loss = model.loss(b.input_ids, labels, b.cu_seqlens, b.position_ids, b.max_seqlen)
            losses.append(loss.item())
            if step == STEPS:
                break
            loss.backward()
            grads = grads or {n: p.main_grad.clone() for n, p in model.named_parameters()}   # fp32 accumulator
            opt.step()
            opt.zero_grad()
    if monkeypatch is not None:
        monkeypatch.undo()
    return Run(losses, grads, launched[0])


@functools.lru_cache(maxsize=None)
def torch_run(name: str, dtype: torch.dtype) -> Run:
    return train(name, dtype, "torch")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name, dtype", TRAINING)
def test_training_triton_matches_torch(name, dtype, monkeypatch):
    ours = train(name, dtype, "triton", monkeypatch)
    reference = torch_run(name, torch.float32)
    same_dtype = torch_run(name, dtype) if dtype != torch.float32 else None
    assert ours.attention_launches > 0, "the 'triton' backend did not launch the kernels of kernels/attention.py"
    assert all(torch.isfinite(torch.tensor(ours.losses))), ours.losses

    def bound(floor: float, own_error: float | None) -> float:
        return max(floor, YARDSTICK * own_error) if own_error is not None else floor

    failures = []
    for n, ref in reference.grads.items():
        own = rel(same_dtype.grads[n], ref) if same_dtype else None
        if rel(ours.grads[n], ref) > bound(FLOOR[dtype], own):
            failures.append(f"grad {n}: {rel(ours.grads[n], ref):.2e} (torch {dtype}: {own})")
    for step, (loss, ref) in enumerate(zip(ours.losses, reference.losses)):
        own = (max(abs(a - b) / b for a, b in zip(same_dtype.losses[:step + 1], reference.losses))
               if same_dtype else None)
        if abs(loss - ref) / ref > bound(LOSS_FLOOR[dtype] * COMPOUNDING ** step, own):
            failures.append(f"loss after {step} steps: {loss:.5f} vs {ref:.5f} (torch {dtype}: {own})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", GENERATION)
def test_generation_with_cuda_graphs(name):
    model = build_model(config(name, vocab_size=4096), DEVICE, torch.float32, seed=0)
    with torch.no_grad():
        for p in model.parameters():            # O(1) logits: greedy outputs that vary
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    g = torch.Generator().manual_seed(1)
    lengths, caps = ((1, 6, 3), (4, 2, 1)) if ON_CPU else ((1, 7, 40, 130, 300, 12, 64, 3),
                                                                    (30, 5, 64, 17, 40, 1, 50, 33))
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in lengths]
    with backend("triton"):
        graphs = greedy_generate(model, prompts, list(caps), [7], cuda_graphs=True)
        eager = greedy_generate(model, prompts, list(caps), [7], cuda_graphs=False)
    with backend("torch"):
        reference = greedy_generate(model, prompts, list(caps), [7], cuda_graphs=False)
    assert graphs == eager == reference
    assert len({tuple(o) for o in reference}) > 1


def test_fsdp2_on_one_device_trains_generates_and_checkpoints(tmp_path):
    """FSDP2 on this device in a one-rank group (NCCL on a GPU, gloo on the CPU): its CUDA path (the
    sharded fp32 model computing in bf16, unshard for the gathered model, CUDA graphs over the gathered
    weights, DCP from device tensors) against a bf16 model with fp32 masters in one process."""
    import socket

    import torch.distributed as dist

    from engine.distributed import gathered, shard_model
    from engine.optim import model_names
    from engine.runs import restore, save_checkpoint
    from engine.train import train_step
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        name = "tiny-qwen2" if ON_CPU else "qwen2-0.5b"
        plain = build_model(config(name), DEVICE, torch.bfloat16, seed=0)
        plain.load_state_dict(initial_weights(name))

        def sharded_model():
            model = build_model(config(name), DEVICE, torch.float32, seed=0)
            model.load_state_dict({k: v.float() for k, v in initial_weights(name).items()})
            return shard_model(model, 1, torch.bfloat16)

        sharded = sharded_model()
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, plain.config.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 1)]
        with backend("triton"):
            with gathered(sharded) as whole:       # the same bf16 weights: the same tokens, graphs and all
                assert whole.dtype == torch.bfloat16 and whole.device.type == DEVICE.type
                assert greedy_generate(whole, prompts, [5, 2, 4], [7]) == greedy_generate(plain, prompts, [5, 2, 4], [7])
            b = packed_batch(plain.config.vocab_size)
            losses = []
            for model in (plain, sharded):
                opt = AdamW(parameter_groups(model, 0.01), lr=LR)
                losses.append([train_step(model, opt, [b], b.num_target_tokens, DEVICE, 1.0)[0].item()
                               for _ in range(STEPS + 1)])
        assert losses[1][0] == losses[0][0]      # identical bf16 weights and kernels before any update
        for step, (got, want) in enumerate(zip(*reversed(losses))):
            assert abs(got - want) / want < LOSS_FLOOR[torch.bfloat16] * COMPOUNDING ** step, (step, losses)
        names = model_names(sharded, opt)
        state = opt.state_dict(names)
        with gathered(sharded) as whole:
            save_checkpoint(tmp_path, whole, None, state, 1, STEPS + 1, {}, {"model": name}, rank=0)
        again = sharded_model()
        again_opt = AdamW(parameter_groups(again, 0.01), lr=LR)
        restore(tmp_path / "checkpoint-1", again_opt, model_names(again, again_opt))
        restored = again_opt.state_dict(model_names(again, again_opt))
        for key in ("weights", "exp_avg", "exp_avg_sq"):
            assert all(torch.equal(restored[key][n].to_local(), t.to_local()) for n, t in state[key].items()), key
        # the saved model/ read back as this rank's shards, allocated on the device from the meta device
        loaded = load_model(tmp_path / "checkpoint-1" / "model", DEVICE, torch.float32,
                            shard=lambda model: shard_model(model, 1, torch.bfloat16, DEVICE))
        with gathered(sharded) as whole:
            saved = {n: p.float() for n, p in whole.named_parameters()}
        assert all(p.to_local().device.type == DEVICE.type and torch.equal(p.to_local(), saved[n])
                   for n, p in loaded.named_parameters())
    finally:
        dist.destroy_process_group()
