"""One new query per sequence against its KV cache (the decode step of greedy generation).

KV-cache layout (per layer): k_cache, v_cache [slots, Hkv, S_max, D]: each (slot, KV head)
holds its keys contiguously, so a decode step streams one dense [len, D] block per head, and
all the query heads of a GQA group share that read.

q [B, Hq, D]: the query of each live sequence (already holding its own k, v in the cache);
cache_seqlens [B] int32: valid cached tokens of each sequence, the current one included (>= 1);
slot_ids [B] or None: the cache slot of each live sequence (None: slot b for sequence b), so
finished sequences can leave the batch without moving any cache;
alibi_slopes [Hq] or None: bias slope * (j - i) with i = cache_seqlens - 1.
-> [B, Hq, D] in q's dtype, softmax in fp32.

Triton kernel (flash-decoding). Grid (B, Hkv, splits): a program reads the K/V rows of its
(slot, KV head) once, for all G = Hq / Hkv query heads of the group at the same time: the group
is the M side of a tl.dot, padded to a power of two >= 16 (G is 7, 6 or 1 for the models here).
Scores are kept in the exp2 domain (scale and slopes carry log2(e)). Lengths are read on the
device: a sequence's rows [0, len) are cut into `splits` chunks of ceil(len / splits) rounded up
to BLOCK_N, and programs whose chunk is empty (or lies past len) exit at once, so the grid needs
no host sync. With one split the program writes the output; with several, each writes its
normalized partial output and log-sum-exp, and a combine kernel merges them:
out = sum_s 2^(lse_s - lse) o_s with lse = log2 sum_s 2^lse_s.
Split rule (`decode_num_splits`): one split when slots * Hkv programs already fill the SMs, else
enough splits for about two programs per SM rounded up to a power of two, at most 16 and at most
S_max / BLOCK_N. It follows the cache (slots, S_max), not the live batch: the split count is a
compile-time constant, so one evaluation (one cache) compiles one variant in its first step and
none as its batch shrinks; powers of two let caches of other sizes share variants.
"""
from __future__ import annotations

import math

import torch

from kernels.dispatch import INTERPRETING, tl, triton, use_triton
from kernels.hardware import TARGETS, Hardware
from kernels.launch import (LOG2E, LaunchConfig, dot_types, fit_shared_memory, hardware_for, load_tile, on_device,
                            online_softmax_step)

MAX_SPLITS = 16


def decode_attention_reference(q, k_cache, v_cache, cache_seqlens, slot_ids=None, alibi_slopes=None, scale=None):
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if slot_ids is None:
        slot_ids = torch.arange(batch, device=q.device)
    span = int(cache_seqlens.max()) if batch else 0
    k = k_cache[:, :, :span].index_select(0, slot_ids).float()       # [B, Hkv, S, D]; 10x an advanced-index gather on CPU
    v = v_cache[:, :, :span].index_select(0, slot_ids).float()
    qg = q.float().view(batch, n_kv, n_heads // n_kv, head_dim)      # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k) * scale
    j = torch.arange(span, device=q.device)
    rel = (j[None, :] - (cache_seqlens.long()[:, None] - 1)).float()  # [B, S]: j - i
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().view(n_kv, n_heads // n_kv)
        scores = scores + slopes[None, :, :, None] * rel[:, None, None, :]
    scores = scores.masked_fill(rel[:, None, None, :] > 0, float("-inf"))
    out = torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), v)
    return out.reshape(batch, n_heads, head_dim).to(q.dtype)


def decode_launch_config(head_dim: int, group: int = 1, interpreting: bool = INTERPRETING,
                         dtype: torch.dtype = torch.bfloat16, hw: Hardware = TARGETS[90]) -> LaunchConfig:
    """(BLOCK_M = the GQA group padded to a power of two >= 16, BLOCK_N = cache rows per tile,
    num_warps, num_stages) on `hw`: 64-row K/V tiles three stages deep, fewer stages or rows where
    its shared memory per block is smaller. fp32 caches at d128 take 8 warps: with 4 the fp32
    tiles spill registers on sm_90."""
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"decode attention supports head_dim 16, 32, 64, 128 or 256, got {head_dim}")
    group_pad = max(16, triton.next_power_of_2(group))
    if interpreting:
        return LaunchConfig(group_pad, 32, 4, 1)
    cfg = LaunchConfig(group_pad, 64, 8 if dtype == torch.float32 and head_dim > 64 else 4, 3)
    row = head_dim * torch.empty((), dtype=dtype).element_size()
    # streams K and V tiles past the group's query rows
    return fit_shared_memory(cfg, hw, lambda c: (2 * c.block_n * row, c.block_m * row), halve=("block_n",))


def decode_num_splits(batch: int, n_kv: int, s_max: int, block_n: int, device) -> int:
    """How many chunks each sequence's cache is split into (see the module docstring)."""
    sms = hardware_for(device).sm_count
    programs = batch * n_kv
    if programs == 0 or programs >= sms:
        return 1
    wanted = triton.next_power_of_2(triton.cdiv(2 * sms, programs))
    return max(1, min(wanted, triton.cdiv(s_max, block_n), MAX_SPLITS))


@triton.jit
def _split_chunk(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows per split of a sequence: ceil(len / splits) rounded up to BLOCK_N."""
    return tl.cdiv(tl.maximum(seq_len, 1), NUM_SPLITS * BLOCK_N) * BLOCK_N


@triton.jit
def _decode_kernel(Q, K, V, O, PART_O, PART_LSE, SEQLENS, SLOTS, SLOPES, qk_scale, group, n_heads,
                   stride_qb, stride_qh, stride_ks, stride_kh, stride_kt, stride_vs, stride_vh, stride_vt,
                   stride_ob, stride_oh,
                   HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQLENS + b)
    chunk = _split_chunk(seq_len, NUM_SPLITS, BLOCK_N)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    if lo >= hi:
        return
    slot = tl.load(SLOTS + b).to(tl.int64)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < group
    heads = kv_head * group + offs_g
    q = load_tile(Q + b * stride_qb + kv_head * group * stride_qh, offs_g, stride_qh, offs_d, group, True).to(DOT_DTYPE)
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + heads, mask=g_ok, other=0.0)
    k_base = K + slot * stride_ks + kv_head * stride_kh
    v_base = V + slot * stride_vs + kv_head * stride_vh

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = load_tile(k_base, offs_n, stride_kt, offs_d, hi, True)
        v = load_tile(v_base, offs_n, stride_vt, offs_d, hi, True)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale     # [GROUP_PAD, BLOCK_N]
        if HAS_ALIBI:
            s += slope2[:, None] * (offs_n - (seq_len - 1)).to(tl.float32)[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, DOT_DTYPE, PRECISION)
    out = acc / l_i[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_ok[:, None])
    else:
        row = (b * n_heads + heads) * NUM_SPLITS + split                    # PART_* [B, Hq, NUM_SPLITS, ...]
        tl.store(PART_O + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_ok[:, None])
        tl.store(PART_LSE + row, m_i + tl.log2(l_i), mask=g_ok)


@triton.jit
def _decode_combine_kernel(PART_O, PART_LSE, O, SEQLENS, n_heads, stride_ob, stride_oh,
                           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                           SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(SEQLENS + b)
    n_written = tl.cdiv(seq_len, _split_chunk(seq_len, NUM_SPLITS, BLOCK_N))   # splits with rows
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < n_written
    row = (b * n_heads + head) * NUM_SPLITS + offs_s
    lse = tl.load(PART_LSE + row, mask=s_ok, other=float("-inf"))
    parts = tl.load(PART_O + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    weight = tl.exp2(lse - tl.max(lse, 0))
    out = tl.sum(weight[:, None] * parts, 0) / tl.sum(weight, 0)
    tl.store(O + b * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty))


@on_device
def triton_decode_attention(q, k_cache, v_cache, cache_seqlens, slot_ids, alibi_slopes, scale, num_splits):
    batch, n_heads, head_dim = q.shape
    n_slots, n_kv, s_max, _ = k_cache.shape
    if n_heads % n_kv or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)} must be [B, Hq, D] and [slots, Hkv, S_max, D], Hq % Hkv == 0")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the caches' last dimension must be contiguous")
    group = n_heads // n_kv
    cfg = decode_launch_config(head_dim, group, dtype=q.dtype, hw=hardware_for(q))
    q = q if q.stride(-1) == 1 else q.contiguous()
    if slot_ids is None:
        slot_ids = torch.arange(batch, device=q.device)
    if num_splits is None:
        num_splits = decode_num_splits(n_slots, n_kv, s_max, cfg.block_n, q.device)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    parts = torch.empty(batch, n_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, n_heads, num_splits, device=q.device, dtype=torch.float32)
    slopes2 = (alibi_slopes.float() * LOG2E).contiguous() if alibi_slopes is not None else part_lse
    dot_dtype, precision = dot_types(q.dtype)
    _decode_kernel[(batch, n_kv, num_splits)](
        q, k_cache, v_cache, out, parts, part_lse, cache_seqlens, slot_ids, slopes2, scale * LOG2E, group, n_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, GROUP_PAD=cfg.block_m, BLOCK_N=cfg.block_n,
        NUM_SPLITS=num_splits, HAS_ALIBI=alibi_slopes is not None, DOT_DTYPE=dot_dtype, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if num_splits > 1:
        _decode_combine_kernel[(batch, n_heads)](
            parts, part_lse, out, cache_seqlens, n_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_N=cfg.block_n, NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4)
    return out


def decode_attention(q, k_cache, v_cache, cache_seqlens, slot_ids=None, alibi_slopes=None, scale=None,
                     num_splits=None):
    """num_splits: chunks per sequence for the Triton kernel (None: `decode_num_splits`)."""
    if use_triton(q):
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return triton_decode_attention(q, k_cache, v_cache, cache_seqlens, slot_ids, alibi_slopes, scale, num_splits)
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, slot_ids, alibi_slopes, scale)
