"""Causal self-attention over a packed token stream (varlen), GQA and ALiBi.

q [T, Hq, D], k and v [T, Hkv, D] (Hq a multiple of Hkv: query head h reads KV head
h // (Hq // Hkv)), cu_seqlens [B+1] int32 (sequence b is tokens cu[b]:cu[b+1]),
max_seqlen: the longest sequence (host int), alibi_slopes [Hq] fp32 or None.
Within each sequence: out_i = softmax_j<=i(scale * q_i.k_j + slope * (j - i)) v_j, softmax in
fp32; -> [T, Hq, D] in q's dtype. Tokens of different sequences never attend to each other.

Paths (`attention` picks one):
- CUDA with flash-attn >= 2.4 importable (and the backend not forced to "triton"):
  `flash_attn_varlen_func`. Its ALiBi bias is
  -slope * |i + seqlen_k - seqlen_q - j|; with seqlen_q == seqlen_k and causal (j <= i) that is
  slope * (j - i), our convention. Non-causal ALiBi differs (|i - j| is symmetric), so that case
  and fp32 inputs (flash-attn takes fp16/bf16 only) go to the Triton kernel.
- CUDA otherwise (or CPU with the backend forced to triton, under TRITON_INTERPRET=1): the
  Triton FlashAttention-2 kernels below.
- CPU: `attention_reference` (per-sequence SDPA).

Triton kernels. Scores live in the exp2 domain: s2 = q.k * scale * log2(e) + slope * log2(e) * (j - i),
so softmax needs exp2 only; the log-sum-exp saved for backward is lse2 = log2(sum_j 2^s2) [Hq, T] fp32.
- Forward: grid (cdiv(max_seqlen, BLOCK_M), B, Hq); a program takes query block m of sequence b
  for head h and exits when the block starts past the sequence's end (no host sync beyond
  max_seqlen). It streams KV blocks with an online softmax: blocks left of the diagonal without
  masks, then the diagonal block(s) with the causal and length masks; blocks right of it are skipped.
- Backward (FlashAttention-2): delta = rowsum(dO * O) [Hq, T] (preprocess kernel); dK/dV over
  (KV block, B, Hkv), each program looping over the Hq/Hkv query heads of its GQA group and the
  query blocks at or below its diagonal, so the group reduction stays in registers (no atomics,
  no [T, Hq, D] buffer, deterministic); dQ over (query block, B, Hq) like the forward.
  With P = 2^(s2 - lse2): dV = P^T dO, dS = P * (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q.
Supported head dims: powers of two from 16 to 256 (the models use 64 and 128).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from kernels.dispatch import INTERPRETING, get_backend, tl, triton, use_triton, version_at_least
from kernels.hardware import TARGETS, Hardware
from kernels.launch import (LOG2E, LaunchConfig, dot_types, fit_shared_memory, hardware_for, load_tile, on_device,
                            online_softmax_step)

FLASH_ATTN_MIN = (2, 4)   # flash_attn_varlen_func(..., alibi_slopes=) exists from flash-attn 2.4
PASSES = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


def cu_seqlens(lengths, device=None) -> torch.Tensor:
    """[B+1] int32 sequence boundaries of a packed stream of sequences of these lengths: the
    one place the packed layout's `cu_seqlens` is built from lengths."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.as_tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(device) if device is not None else cu


# ---------------------------------------------------------------------------------------------
# Torch reference
# ---------------------------------------------------------------------------------------------

def attention_reference(q, k, v, cu_seqlens, max_seqlen=None, alibi_slopes=None, causal=True, scale=None):
    """One SDPA call over the sequences padded to [B, H, L, D] with a per-sequence causal (and
    ALiBi) mask, computed in fp32: the CPU path and the tests' reference. The padded rows are
    dropped again, so the output is packed like q."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if not lengths or q.shape[0] == 0:
        return torch.empty_like(q)
    pad = lambda t: torch.nn.utils.rnn.pad_sequence(t.split(lengths), batch_first=True).transpose(1, 2).float()  # noqa: E731
    pos = torch.arange(max(lengths), device=q.device)
    real = pos[None, :] < torch.tensor(lengths, device=q.device)[:, None]       # [B, L]
    rel = pos[None, :] - pos[:, None]                                            # [L, L]: j - i
    mask = real[:, None, None, :] & (rel <= 0 if causal else True)               # [B, 1, L, L]
    if alibi_slopes is not None:
        bias = alibi_slopes.float()[None, :, None, None] * rel.float()           # [1, H, L, L]
        mask = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf")) + bias
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[real].to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------

# Preferred on Hopper (sm_90); `attention_launch_config` shrinks them where a GPU's shared
# memory per block is smaller (and takes _PRE_HOPPER_CONFIGS first before sm_90). Sequences here are short (~100-250 tokens), so tiles stay at
# 32-128 rows. The forward and dQ need BLOCK_M % BLOCK_N == 0, dK/dV needs BLOCK_N % BLOCK_M == 0.
# Checked by compiling for sm_80, sm_89 and sm_90 on the CPU (python cli.py kernels): bf16 tiles
# use wgmma (HGMMA) on sm_90, and no configuration spills registers, GQA groups of 7 and 6
# included. Not yet timed on a GPU.
_GPU_CONFIGS = {
    ("fwd", 64): LaunchConfig(128, 64, 4, 3),
    ("fwd", 128): LaunchConfig(128, 64, 8, 3),
    ("bwd_preprocess", 64): LaunchConfig(128, 64, 4, 1),
    ("bwd_preprocess", 128): LaunchConfig(64, 128, 4, 1),
    ("bwd_dkdv", 64): LaunchConfig(32, 64, 8, 2),
    ("bwd_dkdv", 128): LaunchConfig(32, 64, 8, 1),
    ("bwd_dq", 64): LaunchConfig(64, 32, 4, 3),
    ("bwd_dq", 128): LaunchConfig(64, 32, 8, 3),
}
# fp32 inputs: IEEE fp32 dots run on CUDA cores and hold fp32 tiles, so the tiles are smaller
# (the bf16 tiles spill hundreds of bytes to kilobytes per thread in fp32).
_GPU_FP32_CONFIGS = {
    ("fwd", 64): LaunchConfig(64, 32, 8, 2),
    ("fwd", 128): LaunchConfig(32, 16, 8, 1),
    ("bwd_dkdv", 64): LaunchConfig(16, 32, 4, 1),
    ("bwd_dkdv", 128): LaunchConfig(16, 16, 8, 1),     # 16 x 32 spills 20 B on sm_90 with triton 3.9
    ("bwd_dq", 64): LaunchConfig(32, 16, 4, 1),
    ("bwd_dq", 128): LaunchConfig(32, 16, 8, 1),
}
# Before Hopper (sm_80, sm_89: mma.sync keeps the dot operands in registers), where the tiles
# above spill registers with the GQA groups of 7 (8-24 B per thread at 255 registers): more
# warps per tile, or a smaller query tile. Keyed (pass, head dims up to, fp32 inputs).
_PRE_HOPPER_CONFIGS = {
    ("fwd", 64, False): LaunchConfig(128, 64, 8, 3),
    ("bwd_dkdv", 64, False): LaunchConfig(16, 64, 8, 2),
    ("bwd_dkdv", 64, True): LaunchConfig(16, 32, 8, 1),
    ("bwd_dq", 64, True): LaunchConfig(32, 16, 8, 1),
}


def _tile_bytes(pass_name: str, head_dim: int, element_size: int):
    """cfg -> (bytes a pass's loop streams per iteration, bytes it holds throughout), for
    `kernels.launch.fit_shared_memory`: the forward and dQ stream K and V tiles past a Q tile
    (dQ: and dO); dK/dV streams Q, dO and their lse2, delta rows past its K and V tiles."""
    row = head_dim * element_size

    def tile_bytes(cfg):
        if pass_name == "bwd_dkdv":
            return 2 * cfg.block_m * (row + 4), 2 * cfg.block_n * row
        return 2 * cfg.block_n * row, (2 if pass_name == "bwd_dq" else 1) * cfg.block_m * row
    return tile_bytes


def attention_launch_config(head_dim: int, pass_name: str, interpreting: bool = INTERPRETING,
                            dtype: torch.dtype = torch.bfloat16, hw: Hardware = TARGETS[90]) -> LaunchConfig:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one attention pass for `head_dim` on `hw`
    (kernels.launch.hardware_for(q)): the preferred tiles, shrunk until they fit its shared memory.

    Under the interpreter the tiles keep the GPU configs' shape ratios (so the same diagonal
    logic runs) at 64/32 rows, which makes block edges at 32 and 64 tokens testable cheaply.
    """
    if pass_name not in PASSES:
        raise ValueError(f"unknown attention pass {pass_name!r}: choose one of {', '.join(PASSES)}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"attention kernel supports head_dim 16, 32, 64, 128 or 256, got {head_dim}")
    if interpreting:
        return {"fwd": LaunchConfig(64, 32, 4, 1), "bwd_preprocess": LaunchConfig(64, head_dim, 4, 1),
                "bwd_dkdv": LaunchConfig(32, 64, 4, 1), "bwd_dq": LaunchConfig(64, 32, 4, 1)}[pass_name]
    key = (pass_name, 64 if head_dim <= 64 else 128)
    if pass_name == "bwd_preprocess":    # a row reduction: no tiles in shared memory
        return _GPU_CONFIGS[key]
    fp32 = dtype == torch.float32
    cfg = _GPU_FP32_CONFIGS[key] if fp32 else _GPU_CONFIGS[key]
    if hw.arch < 90:
        cfg = _PRE_HOPPER_CONFIGS.get((*key, fp32), cfg)
    element_size = torch.empty((), dtype=dtype).element_size()
    return fit_shared_memory(cfg, hw, _tile_bytes(pass_name, head_dim, element_size))


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _sequence(CU, seq):
    """(first token as int64, length) of sequence `seq` of the packed stream."""
    start = tl.load(CU + seq)
    return start.to(tl.int64), tl.load(CU + seq + 1) - start


@triton.jit
def _slope(SLOPES, head, HAS_ALIBI: tl.constexpr):
    """The head's ALiBi slope (times log2(e)), or 0."""
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + head)
    else:
        slope2 = 0.0
    return slope2


@triton.jit
def _key_blocks(start_m, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(end of the key blocks a query tile at start_m sees unmasked, end of all it sees): causal,
    the blocks left of the diagonal need no mask and those right of it are skipped."""
    if CAUSAL:
        full_end = start_m
        end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        end = seq_len
    return full_end, end


@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, seq_len,
                 qk_scale, slope2, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks lo..hi of one query tile; MASKED applies length/causal masks."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, stride_kt, offs_d, seq_len, MASKED)
        v = load_tile(v_base, offs_n, stride_vt, offs_d, seq_len, MASKED)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
        if HAS_ALIBI:
            s += slope2 * (offs_n[None, :] - offs_m[:, None]).to(tl.float32)
        if MASKED:
            keep = offs_n[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, DOT_DTYPE, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU, SLOPES, qk_scale, n_tokens, group,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    head = tl.program_id(2)
    start, seq_len = _sequence(CU, tl.program_id(1))
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seq_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = load_tile(Q + start * stride_qt + head * stride_qh, offs_m, stride_qt, offs_d, seq_len, True).to(DOT_DTYPE)
    k_base = K + start * stride_kt + (head // group) * stride_kh
    v_base = V + start * stride_vt + (head // group) * stride_vh
    slope2 = _slope(SLOPES, head, HAS_ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, end = _key_blocks(start_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                 0, full_end, seq_len, qk_scale, slope2, BLOCK_N, False, CAUSAL, HAS_ALIBI,
                                 DOT_DTYPE, PRECISION)
    acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                 full_end, end, seq_len, qk_scale, slope2, BLOCK_N, True, CAUSAL, HAS_ALIBI,
                                 DOT_DTYPE, PRECISION)
    out = acc / l_i[:, None]
    o_ptrs = O + start * stride_ot + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head * n_tokens + start + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, n_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                                HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32."""
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < n_tokens
    o = tl.load(O + head * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + head * stride_doh + offs_t[:, None] * stride_dot + offs_d[None, :], mask=ok[:, None],
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * n_tokens + offs_t, delta, mask=ok)


@triton.jit
def _dkdv_q_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                 offs_n, offs_d, lo, hi, seq_len, qk_scale, slope2,
                 BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over query blocks lo..hi of one head (transposed tiles:
    rows are keys). Query rows past the sequence load lse2 = +inf, so their P is exactly 0."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        q = load_tile(q_base, offs_m, stride_qt, offs_d, seq_len, True).to(DOT_DTYPE)
        do = load_tile(do_base, offs_m, stride_dot, offs_d, seq_len, True).to(DOT_DTYPE)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale        # [BLOCK_N, BLOCK_M]
        if HAS_ALIBI:
            s_t += slope2 * (offs_n[:, None] - offs_m[None, :]).to(tl.float32)
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(DOT_DTYPE), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(DOT_DTYPE), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, SLOPES, qk_scale, sm_scale, n_tokens, group,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    kv_head = tl.program_id(2)
    start, seq_len = _sequence(CU, tl.program_id(1))
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seq_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_len
    k = load_tile(K + start * stride_kt + kv_head * stride_kh, offs_n, stride_kt, offs_d, seq_len, True).to(DOT_DTYPE)
    v = load_tile(V + start * stride_vt + kv_head * stride_vh, offs_n, stride_vt, offs_d, seq_len, True).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, group):                    # the GQA group shares this K/V tile
        head = kv_head * group + g
        q_base = Q + start * stride_qt + head * stride_qh
        do_base = DO + start * stride_dot + head * stride_doh
        lse_base = LSE + head * n_tokens + start
        delta_base = DELTA + head * n_tokens + start
        slope2 = _slope(SLOPES, head, HAS_ALIBI)
        if CAUSAL:
            # Queries on the diagonal tile need the causal mask; those below it see every key.
            dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                  offs_n, offs_d, start_n, tl.minimum(start_n + BLOCK_N, seq_len), seq_len,
                                  qk_scale, slope2, BLOCK_M, True, HAS_ALIBI, DOT_DTYPE, PRECISION)
            dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                  offs_n, offs_d, start_n + BLOCK_N, seq_len, seq_len,
                                  qk_scale, slope2, BLOCK_M, False, HAS_ALIBI, DOT_DTYPE, PRECISION)
        else:
            dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                  offs_n, offs_d, 0, seq_len, seq_len,
                                  qk_scale, slope2, BLOCK_M, False, HAS_ALIBI, DOT_DTYPE, PRECISION)
    dk_ptrs = DK + start * stride_dkt + kv_head * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + start * stride_dvt + kv_head * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, seq_len,
                qk_scale, slope2, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_ALIBI: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over key blocks lo..hi."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, stride_kt, offs_d, seq_len, MASKED)
        v = load_tile(v_base, offs_n, stride_vt, offs_d, seq_len, MASKED)
        k = k.to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_ALIBI:
            s += slope2 * (offs_n[None, :] - offs_m[:, None]).to(tl.float32)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            keep = offs_n[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v.to(DOT_DTYPE)), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, SLOPES, qk_scale, sm_scale, n_tokens, group,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dqt, stride_dqh,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    head = tl.program_id(2)
    start, seq_len = _sequence(CU, tl.program_id(1))
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seq_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = load_tile(Q + start * stride_qt + head * stride_qh, offs_m, stride_qt, offs_d, seq_len, True).to(DOT_DTYPE)
    do = load_tile(DO + start * stride_dot + head * stride_doh, offs_m, stride_dot, offs_d, seq_len,
                   True).to(DOT_DTYPE)
    lse2 = tl.load(LSE + head * n_tokens + start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + head * n_tokens + start + offs_m, mask=row_ok, other=0.0)
    k_base = K + start * stride_kt + (head // group) * stride_kh
    v_base = V + start * stride_vt + (head // group) * stride_vh
    slope2 = _slope(SLOPES, head, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, end = _key_blocks(start_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full_end,
                     seq_len, qk_scale, slope2, BLOCK_N, False, CAUSAL, HAS_ALIBI, DOT_DTYPE, PRECISION)
    dq = _dq_kv_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full_end, end,
                     seq_len, qk_scale, slope2, BLOCK_N, True, CAUSAL, HAS_ALIBI, DOT_DTYPE, PRECISION)
    dq_ptrs = DQ + start * stride_dqt + head * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, cu_seqlens):
    n_heads, n_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != head_dim:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "[T, Hq, D], [T, Hkv, D], [T, Hkv, D]")
    if n_heads % n_kv:
        raise ValueError(f"attention: {n_heads} query heads is not a multiple of {n_kv} KV heads")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"attention: cu_seqlens must be int32, got {cu_seqlens.dtype}")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _slopes_log2(alibi_slopes, ref):
    """ALiBi slopes pre-multiplied by log2(e) (a dummy pointer when absent)."""
    if alibi_slopes is None:
        return torch.zeros(1, device=ref.device, dtype=torch.float32)
    return (alibi_slopes.float() * LOG2E).contiguous()


@on_device
def flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale):
    """-> out [T, Hq, D] in q's dtype, lse2 [Hq, T] fp32 (log2 domain)."""
    n_tokens, n_heads, head_dim = q.shape
    cfg = attention_launch_config(head_dim, "fwd", dtype=q.dtype, hw=hardware_for(q))
    out = torch.empty_like(q)
    lse2 = torch.empty(n_heads, n_tokens, device=q.device, dtype=torch.float32)
    dot_dtype, precision = dot_types(q.dtype)
    grid = (triton.cdiv(max_seqlen, cfg.block_m), cu_seqlens.numel() - 1, n_heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse2, cu_seqlens, _slopes_log2(alibi_slopes, q), scale * LOG2E, n_tokens,
        n_heads // k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        HAS_ALIBI=alibi_slopes is not None, DOT_DTYPE=dot_dtype, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse2


@on_device
def flash_attention_backward(do, q, k, v, out, lse2, cu_seqlens, max_seqlen, alibi_slopes, causal, scale):
    """-> dq, dk, dv like q, k, v."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    n_seqs = cu_seqlens.numel() - 1
    do = _last_dim_contiguous(do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse2)
    dot_dtype, precision = dot_types(q.dtype)
    slopes2 = _slopes_log2(alibi_slopes, q)
    hw = hardware_for(q)
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_ALIBI=alibi_slopes is not None,
                  DOT_DTYPE=dot_dtype, PRECISION=precision)

    cfg = attention_launch_config(head_dim, "bwd_preprocess", dtype=q.dtype, hw=hw)
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_tokens, cfg.block_m), n_heads)](
        out, do, delta, n_tokens, out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=head_dim, BLOCK_T=cfg.block_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = attention_launch_config(head_dim, "bwd_dkdv", dtype=q.dtype, hw=hw)
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg.block_n), n_seqs, n_kv)](
        q, k, v, do, lse2, delta, dk, dv, cu_seqlens, slopes2, scale * LOG2E, scale, n_tokens, n_heads // n_kv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)

    cfg = attention_launch_config(head_dim, "bwd_dq", dtype=q.dtype, hw=hw)
    _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg.block_m), n_seqs, n_heads)](
        q, k, v, do, lse2, delta, dq, cu_seqlens, slopes2, scale * LOG2E, scale, n_tokens, n_heads // n_kv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale):
        out, lse2 = flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse2, cu_seqlens, alibi_slopes)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse2, cu_seqlens, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, out, lse2, cu_seqlens, ctx.max_seqlen, alibi_slopes,
                                     ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def _prepare(q, k, v, cu_seqlens, max_seqlen, scale):
    _check_inputs(q, k, v, cu_seqlens)
    if max_seqlen is None:           # a host sync: callers with a PackedBatch pass max_seqlen
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return (*map(_last_dim_contiguous, (q, k, v)), cu_seqlens.contiguous(), max_seqlen, scale)


def triton_attention(q, k, v, cu_seqlens, max_seqlen=None, alibi_slopes=None, causal=True, scale=None):
    """The Triton FlashAttention path with autograd, whatever is installed (benchmarks, tests)."""
    q, k, v, cu_seqlens, max_seqlen, scale = _prepare(q, k, v, cu_seqlens, max_seqlen, scale)
    return _FlashAttention.apply(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale)


def triton_attention_with_lse(q, k, v, cu_seqlens, max_seqlen=None, alibi_slopes=None, causal=True, scale=None):
    """Forward only: (out [T, Hq, D], lse [T, Hq] fp32 natural log-sum-exp of the biased, scaled scores)."""
    q, k, v, cu_seqlens, max_seqlen, scale = _prepare(q, k, v, cu_seqlens, max_seqlen, scale)
    out, lse2 = flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale)
    return out, lse2.t() / LOG2E


def load_flash_attn():
    """flash_attn_varlen_func of an installed flash-attn recent enough for what we call, else None."""
    try:
        import flash_attn
    except (ImportError, OSError):   # not installed, or built against another torch
        return None
    if not version_at_least(getattr(flash_attn, "__version__", "0.0"), FLASH_ATTN_MIN):
        return None
    return flash_attn.flash_attn_varlen_func


flash_attn_varlen_func = load_flash_attn()


def _flash_attn_usable(q, alibi_slopes, causal) -> bool:
    """flash-attn takes CUDA fp16/bf16 inputs with our ALiBi convention (causal only); the backend
    forced to "triton" runs our own kernels even where flash-attn is installed."""
    return (flash_attn_varlen_func is not None and get_backend() != "triton" and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and (alibi_slopes is None or causal))


def flash_attn_attention(q, k, v, cu_seqlens, max_seqlen=None, alibi_slopes=None, causal=True, scale=None):
    """flash-attn's varlen attention; alibi_slopes is passed only when set (the keyword is recent)."""
    q, k, v, cu_seqlens, max_seqlen, scale = _prepare(q, k, v, cu_seqlens, max_seqlen, scale)
    alibi = {} if alibi_slopes is None else {"alibi_slopes": alibi_slopes.float().contiguous()}
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale,
                                  causal=causal, **alibi)


def attention(q, k, v, cu_seqlens, max_seqlen=None, alibi_slopes=None, causal=True, scale=None):
    if not use_triton(q):
        return attention_reference(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale)
    if _flash_attn_usable(q, alibi_slopes, causal):
        return flash_attn_attention(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale)
    return triton_attention(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale)
