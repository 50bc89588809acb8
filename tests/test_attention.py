"""Triton varlen FlashAttention (interpreter) against a float64 reference: output, log-sum-exp
and every gradient, over packed batches with block-edge lengths, GQA, ALiBi, head_dim 64/128."""
import sys
from types import SimpleNamespace

import pytest
import torch

import kernels
import kernels.attention as attention_module
from kernels.attention import (attention, attention_launch_config, cu_seqlens, triton_attention,
                               triton_attention_with_lse)
from kernels.hardware import TARGETS
from kernels.launch import hardware_for, target, tile_shared_bytes
from models.bloom import alibi_slopes   # checked against transformers in test_models
from tests.helpers import rel_err

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # interpreter


def reference(q, k, v, lengths, slopes, causal, scale):
    """Dense attention per sequence in q's dtype -> (out [T, Hq, D], lse [T, Hq])."""
    group = q.shape[1] // k.shape[1]
    outs, lses, start = [], [], 0
    for n in lengths:
        qs = q[start:start + n].transpose(0, 1)                                  # [Hq, n, D]
        ks = k[start:start + n].repeat_interleave(group, 1).transpose(0, 1)
        vs = v[start:start + n].repeat_interleave(group, 1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        pos = torch.arange(n)
        rel = (pos[None, :] - pos[:, None]).to(q.dtype)                           # j - i
        if slopes is not None:
            scores = scores + slopes.to(q.dtype)[:, None, None] * rel
        if causal:
            scores = scores.masked_fill(rel > 0, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        lses.append(scores.logsumexp(-1).t())
        start += n
    return torch.cat(outs), torch.cat(lses)


def run_case(lengths, n_heads, n_kv, head_dim, alibi, causal, dtype):
    """-> errors of (out, lse, dq, dk, dv) of the Triton kernels against the reference, computed in
    float64 for fp32 inputs and in fp32 for bf16 inputs."""
    n_tokens = sum(lengths)
    cu = cu_seqlens(lengths)
    q, k, v = (torch.randn(n_tokens, h, head_dim).to(dtype) for h in (n_heads, n_kv, n_kv))
    dout = torch.randn(n_tokens, n_heads, head_dim).to(dtype)
    slopes = alibi_slopes(n_heads) if alibi else None
    scale = head_dim ** -0.5
    with kernels.backend("triton"):
        qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
        out = triton_attention(qt, kt, vt, cu, max(lengths), slopes, causal, scale)
        out.backward(dout)
        out_lse, lse = triton_attention_with_lse(q, k, v, cu, max(lengths), slopes, causal, scale)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    qr, kr, vr = (t.to(ref_dtype).requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference(qr, kr, vr, lengths, slopes, causal, scale)
    ref_out.backward(dout.to(ref_dtype))
    assert out.dtype == dtype and qt.grad.dtype == dtype and kt.grad.shape == k.shape
    assert torch.equal(out, out_lse)
    return [rel_err(a, b) for a, b in ((out, ref_out), (lse, ref_lse), (qt.grad, qr.grad), (kt.grad, kr.grad),
                                        (vt.grad, vr.grad))]


CASES = {  # lengths, Hq, Hkv, head_dim, alibi, causal, dtype
    "qwen2-0.5b-gqa14-2-d64": ([1, 63, 0, 64, 65], 14, 2, 64, False, True, torch.float32),
    "qwen2-1.5b-gqa12-2-d128": ([65, 33], 12, 2, 128, False, True, torch.float32),
    "qwen1.5-mha16-d64": ([64, 1], 16, 16, 64, False, True, torch.float32),
    "long-300-gqa4-2": ([300], 4, 2, 64, False, True, torch.float32),
    "bloom-alibi16-d64": ([40, 1], 16, 16, 64, True, True, torch.float32),
    "bloom-alibi12-d128": ([63, 20], 12, 12, 128, True, True, torch.float32),
    "noncausal-alibi-gqa": ([70, 5], 8, 2, 64, True, False, torch.float32),
    "bf16-qwen2-0.5b-gqa14-2-d64": ([65, 1], 14, 2, 64, False, True, torch.bfloat16),
    "bf16-bloom-alibi12-d128": ([63, 20], 12, 12, 128, True, True, torch.bfloat16),
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_reference(case, poisoned_empty):
    """fp32 against the float64 reference, bf16 against the fp32 one (run_case)."""
    errors = run_case(*CASES[case])
    assert max(errors) < TOLERANCE[CASES[case][-1]], dict(zip(("out", "lse", "dq", "dk", "dv"), errors))


def test_non_contiguous_qkv_views():
    """q, k, v sliced out of one fused projection output (token stride 3 * H * D)."""
    lengths, n_heads, head_dim = [40, 9], 4, 64
    qkv = torch.randn(sum(lengths), 3, n_heads, head_dim)
    q, k, v = qkv.unbind(1)
    cu = cu_seqlens(lengths)
    with kernels.backend("triton"):
        out = attention(q, k, v, cu, max(lengths))
    ref, _ = reference(q.double(), k.double(), v.double(), lengths, None, True, head_dim ** -0.5)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_launch_configs_fit_each_target(arch, head_dim, dtype):
    """Each pass's tiles fit the target's shared memory per block, and keep the diagonal logic:
    the forward and dQ walk key tiles inside a query tile (BLOCK_M % BLOCK_N == 0); dK/dV walks
    query tiles inside a key tile (BLOCK_N % BLOCK_M == 0)."""
    hw = TARGETS[arch]
    for pass_name in ("fwd", "bwd_dkdv", "bwd_dq"):
        cfg = attention_launch_config(head_dim, pass_name, interpreting=False, dtype=dtype, hw=hw)
        tiles = attention_module._tile_bytes(pass_name, head_dim, dtype.itemsize)(cfg)
        assert tile_shared_bytes(cfg, hw, *tiles) <= hw.shared_memory_per_block, (pass_name, cfg)
        inner, outer = (cfg.block_m, cfg.block_n) if pass_name == "bwd_dkdv" else (cfg.block_n, cfg.block_m)
        assert outer % inner == 0 and inner >= 16, (pass_name, cfg)
    with pytest.raises(ValueError, match="head_dim"):
        attention_launch_config(96, "fwd")


def test_launch_configs_follow_the_device_s_shared_memory():
    """The bf16 d128 forward's Hopper tiles (128 KB three stages deep) on an H100, fewer stages on
    an L40S-class card (~99 KB per block); the current target (kernels.launch.target) decides
    for meta tensors, as in the compile report."""
    h100 = attention_launch_config(128, "fwd", interpreting=False, hw=TARGETS[90])
    l40s = attention_launch_config(128, "fwd", interpreting=False, hw=TARGETS[89])
    assert h100 == (128, 64, 8, 3) and l40s.num_stages < h100.num_stages
    with target(TARGETS[89]):
        assert hardware_for(torch.empty(1, device="meta")) is TARGETS[89]
    assert hardware_for(torch.empty(1)) is TARGETS[90]


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: attention's GPU dispatch, on the CPU."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """Installs a stand-in flash_attn module of a given version; returns the calls it received."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(q)

    def install(version):
        monkeypatch.setitem(sys.modules, "flash_attn", SimpleNamespace(
            __version__=version, flash_attn_varlen_func=flash_attn_varlen_func))
        monkeypatch.setattr(attention_module, "flash_attn_varlen_func", attention_module.load_flash_attn())
        return calls
    return install


@pytest.mark.parametrize("version, backend, path", [
    ("2.3.6", "auto", "triton"),       # no alibi_slopes= yet: our kernel
    ("2.4.0", "auto", "flash"),
    ("2.8.3", "auto", "flash"),
    ("2.8.3", "triton", "triton"),     # forced: our own kernel even with flash-attn installed
])
def test_flash_attn_used_only_from_a_version_with_what_we_call(monkeypatch, fake_flash_attn, version, backend,
                                                               path):
    calls, ours = fake_flash_attn(version), []

    def our_forward(q, *args):
        ours.append(q.shape)
        return torch.zeros_like(q), torch.zeros(q.shape[1], q.shape[0])

    monkeypatch.setattr(attention_module, "flash_attention_forward", our_forward)
    q = torch.randn(5, 2, 16, dtype=torch.bfloat16).as_subclass(FakeCuda)
    with kernels.backend(backend):
        attention(q, q, q, cu_seqlens([5]), 5)
    assert (len(calls), len(ours)) == ((1, 0) if path == "flash" else (0, 1))


def test_flash_attn_gets_alibi_slopes_only_when_set(fake_flash_attn):
    calls = fake_flash_attn("2.6.3")
    q = torch.randn(5, 4, 16, dtype=torch.bfloat16).as_subclass(FakeCuda)
    attention(q, q, q, cu_seqlens([5]), 5)                                        # Qwen2
    slopes = alibi_slopes(4)
    attention(q, q, q, cu_seqlens([5]), 5, alibi_slopes=slopes)                   # BLOOM
    assert "alibi_slopes" not in calls[0]
    assert torch.equal(calls[1]["alibi_slopes"], slopes)


MODEL_CONFIGS = {
    "qwen2-gqa": {"model_type": "qwen2", "vocab_size": 97, "hidden_size": 128, "intermediate_size": 96,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "tie_word_embeddings": True},
    "bloom-alibi": {"model_type": "bloom", "vocab_size": 97, "hidden_size": 96, "n_layer": 2, "n_head": 6},
}


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_packed_logits_same_with_triton_backend(name):
    """A tiny random Qwen2 (GQA 4/2, d32) and BLOOM (ALiBi, 6 heads, d16): packed logits with every
    op on its torch reference and with every op on its Triton kernel."""
    from models import ModelConfig, build_model
    model = build_model(ModelConfig.from_dict(MODEL_CONFIGS[name]), device="cpu", dtype=torch.float32, seed=0)
    lengths = [33, 1, 20]
    ids = torch.randint(0, 97, (sum(lengths),))
    cu = cu_seqlens(lengths)
    with torch.no_grad():
        with kernels.backend("torch"):
            ref = model(ids, cu_seqlens=cu, max_seqlen=max(lengths))
        with kernels.backend("triton"):
            out = model(ids, cu_seqlens=cu, max_seqlen=max(lengths))
    assert rel_err(out, ref) < 1e-5


def test_bloom_trains_through_triton_after_a_first_forward_in_inference_mode():
    """The ALiBi slopes cached by a first forward under torch.inference_mode (an evaluation before
    training) are a normal tensor: a training forward + backward through the Triton attention saves
    them for backward, and its gradients match the torch path's."""
    from models import ModelConfig, build_model
    model = build_model(ModelConfig.from_dict(MODEL_CONFIGS["bloom-alibi"]), device="cpu", dtype=torch.float32, seed=0)
    lengths = [9, 4]
    ids = torch.randint(0, 97, (sum(lengths),))
    cu = cu_seqlens(lengths)
    with torch.inference_mode(), kernels.backend("triton"):
        model(ids, cu_seqlens=cu, max_seqlen=max(lengths))
    grads = {}
    for name in ("torch", "triton"):
        model.zero_grad()
        with kernels.backend(name):
            model(ids, cu_seqlens=cu, max_seqlen=max(lengths)).square().mean().backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert rel_err(grads["triton"], grads["torch"]) < 1e-5


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_loss_gradients_same_with_triton_backend(name):
    """Training through every Triton kernel (Qwen2: the fused qkv and gate_up projections' rope_qkv and
    swiglu, one gradient each; the fused loss) gives the torch path's loss and parameter gradients."""
    from models import ModelConfig, build_model
    model = build_model(ModelConfig.from_dict(MODEL_CONFIGS[name]), device="cpu", dtype=torch.float32, seed=0)
    lengths = [17, 1, 6]
    ids, labels = torch.randint(0, 97, (sum(lengths),)), torch.randint(0, 97, (sum(lengths),))
    cu = cu_seqlens(lengths)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with kernels.backend(backend):
            loss = model.loss(ids, labels, cu, max_seqlen=max(lengths))
        loss.backward()
        results[backend] = loss.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert abs(results["triton"][0] - results["torch"][0]) < 1e-5 * results["torch"][0]
    assert rel_err(results["triton"][1], results["torch"][1]) < 1e-5
