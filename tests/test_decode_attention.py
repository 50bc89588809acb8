"""Triton decode attention (interpreter) against a float64 reference over random KV caches:
mixed lengths 1..S_max, a permuted subset of slots, GQA, ALiBi, split-K on and off."""

import pytest
import torch

import kernels
from kernels.attention import cu_seqlens
from kernels.decode_attention import (decode_attention, decode_attention_reference, decode_launch_config,
                                     decode_num_splits)
from kernels.hardware import TARGETS
from kernels.launch import target, tile_shared_bytes
from models.bloom import alibi_slopes
from tests.helpers import rel_err
from tests.test_attention import MODEL_CONFIGS

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # interpreter


def reference(q, k_cache, v_cache, lengths, slot_ids, slopes, scale):
    """Per sequence, only the cached rows [0, len) of its slot, in q's dtype."""
    group = q.shape[1] // k_cache.shape[1]
    out = []
    for b, (n, slot) in enumerate(zip(lengths.tolist(), slot_ids.tolist())):
        k = k_cache[slot, :, :n].repeat_interleave(group, 0)                # [Hq, n, D]
        v = v_cache[slot, :, :n].repeat_interleave(group, 0)
        scores = torch.einsum("hd,hnd->hn", q[b], k) * scale
        if slopes is not None:
            scores = scores + slopes.to(q.dtype)[:, None] * (torch.arange(n) - (n - 1)).to(q.dtype)
        out.append(torch.einsum("hn,hnd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def random_cache(batch, n_slots, n_heads, n_kv, head_dim, s_max, dtype):
    """Caches whose rows past each live sequence's length, and whose unused slots, are NaN:
    reading any of them poisons the output."""
    k_cache = torch.randn(n_slots, n_kv, s_max, head_dim)
    v_cache = torch.randn(n_slots, n_kv, s_max, head_dim)
    slot_ids = torch.randperm(n_slots)[:batch]
    lengths = torch.randint(1, s_max + 1, (batch,), dtype=torch.int32)
    lengths[0], lengths[-1] = 1, s_max
    valid = torch.zeros(n_slots, s_max, dtype=torch.bool)
    for slot, n in zip(slot_ids.tolist(), lengths.tolist()):
        valid[slot, :n] = True
    for cache in (k_cache, v_cache):
        cache.masked_fill_(~valid[:, None, :, None], float("nan"))
    q = torch.randn(batch, n_heads, head_dim)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), lengths, slot_ids


CASES = {  # batch, slots, Hq, Hkv, head_dim, S_max, alibi, dtype
    "qwen2-0.5b-gqa14-2-d64": (5, 8, 14, 2, 64, 80, False, torch.float32),
    "qwen2-1.5b-gqa12-2-d128": (4, 6, 12, 2, 128, 70, False, torch.float32),
    "qwen1.5-mha16-d64": (3, 5, 16, 16, 64, 40, False, torch.float32),
    "bloom-alibi16-d64": (3, 5, 16, 16, 64, 70, True, torch.float32),
    "bloom-alibi12-d128": (3, 4, 12, 12, 128, 40, True, torch.float32),
    "bf16-gqa14-2-alibi-d64": (4, 6, 14, 2, 64, 70, True, torch.bfloat16),
}
SPLITS = {torch.float32: [1, 3], torch.bfloat16: [1, None]}      # None: the split rule decides
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("case, num_splits", [(case, n) for case in CASES for n in SPLITS[CASES[case][-1]]])
def test_decode_matches_reference(case, num_splits, poisoned_empty):
    """fp32 against the float64 reference, bf16 against the fp32 one."""
    batch, n_slots, n_heads, n_kv, head_dim, s_max, alibi, dtype = CASES[case]
    q, k_cache, v_cache, lengths, slot_ids = random_cache(batch, n_slots, n_heads, n_kv, head_dim, s_max, dtype)
    slopes = alibi_slopes(n_heads) if alibi else None
    with kernels.backend("triton"):
        out = decode_attention(q, k_cache, v_cache, lengths, slot_ids, slopes, num_splits=num_splits)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    want = reference(q.to(ref_dtype), k_cache.to(ref_dtype), v_cache.to(ref_dtype), lengths, slot_ids, slopes,
                     head_dim ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, want) < TOLERANCE[dtype]


def test_decode_default_slots_and_reference_agree():
    """slot_ids=None means slot b for sequence b; the shipped reference matches ours."""
    q, k_cache, v_cache, lengths, _ = random_cache(3, 3, 4, 2, 64, 50, torch.float32)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()
    with kernels.backend("triton"):
        out = decode_attention(q, k_cache, v_cache, lengths)
    assert rel_err(out, decode_attention_reference(q, k_cache, v_cache, lengths)) < 1e-5


def test_split_rule_fills_the_gpu_only_when_needed():
    cpu = torch.device("cpu")
    assert decode_num_splits(batch=256, n_kv=2, s_max=512, block_n=64, device=cpu) == 1
    assert decode_num_splits(batch=64, n_kv=2, s_max=512, block_n=64, device=cpu) == 4     # 3, bucketed
    assert decode_num_splits(batch=1, n_kv=2, s_max=4096, block_n=64, device=cpu) == 16
    assert decode_num_splits(batch=1, n_kv=2, s_max=100, block_n=64, device=cpu) == 2


def test_split_rule_counts_the_target_s_multiprocessors():
    cpu = torch.device("cpu")
    with target(TARGETS[89]):     # 142 SMs: 136 programs leave some idle
        assert decode_num_splits(batch=68, n_kv=2, s_max=512, block_n=64, device=cpu) == 4
    assert decode_num_splits(batch=68, n_kv=2, s_max=512, block_n=64, device=cpu) == 1    # 132 SMs (sm_90)


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim, group", [(64, 7), (128, 6), (64, 1), (128, 1), (256, 32)])
def test_gpu_launch_config_fits_each_target(arch, dtype, head_dim, group):
    """The query tile holds the whole GQA group, and the K/V tiles fit the target's shared memory
    (the fp32 d128 tiles three stages deep need 143 KB: more than an L40S block has)."""
    hw = TARGETS[arch]
    cfg = decode_launch_config(head_dim, group, interpreting=False, dtype=dtype, hw=hw)
    row = head_dim * dtype.itemsize
    assert cfg.block_m >= max(16, group) and cfg.block_m & (cfg.block_m - 1) == 0 and cfg.block_n >= 16
    assert tile_shared_bytes(cfg, hw, 2 * cfg.block_n * row, cfg.block_m * row) <= hw.shared_memory_per_block
    if arch == 90 and head_dim <= 128:
        assert (cfg.block_n, cfg.num_stages) == (64, 3)          # Hopper keeps the preferred tiles


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_decode_step_matches_full_forward(name):
    """Prefill three prompts into permuted cache slots, then one decode step with every op on its
    Triton kernel: the step's logits equal the last-position logits of the full sequences (torch)."""
    from models import KVCache, ModelConfig, build_model
    config = ModelConfig.from_dict(MODEL_CONFIGS[name])
    model = build_model(config, device="cpu", dtype=torch.float32, seed=0)
    lengths = torch.tensor([5, 20, 1])
    prompts = torch.randint(0, config.vocab_size, (int(lengths.sum()),))
    new_tokens = torch.randint(0, config.vocab_size, (3,))
    slot_ids = torch.tensor([3, 0, 4])
    cache = KVCache(config, slots=5, max_len=24)
    with torch.no_grad():
        with kernels.backend("triton"):
            model.prefill(prompts, cu_seqlens(lengths.tolist()), cache, slot_ids)
            step = model.decode_step(new_tokens, lengths, cache, slot_ids)
        full = torch.cat([torch.cat([p, t[None]]) for p, t in zip(prompts.split(lengths.tolist()), new_tokens)])
        with kernels.backend("torch"):
            want = model(full, cu_seqlens=cu_seqlens((lengths + 1).tolist()))[(lengths + 1).cumsum(0) - 1]
    assert rel_err(step, want) < 1e-5


def test_split_count_follows_the_cache_not_the_live_batch(monkeypatch):
    """Every batch size of one cache launches the same split count (one compiled variant an evaluation)
    and split counts are powers of two (or the cache's S_max / BLOCK_N cap)."""
    import kernels.decode_attention as da
    seen = set()
    real = da.decode_num_splits
    monkeypatch.setattr(da, "decode_num_splits", lambda *a, **k: seen.add(real(*a, **k)) or real(*a, **k))
    slots, n_kv, s_max, d = 9, 2, 80, 64
    k_cache, v_cache = torch.randn(slots, n_kv, s_max, d), torch.randn(slots, n_kv, s_max, d)
    with kernels.backend("triton"):
        for batch in (8, 3, 1):
            q = torch.randn(batch, 4, d)
            lengths = torch.randint(1, s_max + 1, (batch,), dtype=torch.int32)
            out = decode_attention(q, k_cache, v_cache, lengths, torch.arange(batch))
            assert rel_err(out, decode_attention_reference(q, k_cache, v_cache, lengths)) < 1e-5
    assert len(seen) == 1
    cpu = torch.device("cpu")
    for batch in range(1, 70):
        n = decode_num_splits(batch=batch, n_kv=2, s_max=4096, block_n=64, device=cpu)
        assert n & (n - 1) == 0
