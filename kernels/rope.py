"""Rotary position embedding, NeoX half-rotation layout (Qwen2).

q [T, Hq, D], k [T, Hkv, D] packed tokens, position_ids [T] (restarting at 0 per sequence),
theta: the base. With inv_freq_i = theta^(-2i/D) and angle = pos * inv_freq (fp32):
    out = x * cos(angle ++ angle) + rotate_half(x) * sin(angle ++ angle),
    rotate_half(x) = (-x[D/2:], x[:D/2]).
Returns (q_rot, k_rot) in the input dtype.

Triton path: one program per token rotates all q and k heads of that token. cos and sin are
computed in-kernel from the token's position and the [D/2] fp32 inv_freq vector (made by the
same torch code as the reference, so angles match bit for bit); on the GPU tl.cos/tl.sin are
libdevice's accurate cosf/sinf, with full range reduction for large positions. No table, no
host sync. The backward is the inverse rotation (angle -> -angle) of the incoming gradients.
q and k may be strided views (e.g. slices of a fused qkv projection) with unit last stride.
`rope_qkv` takes the fused projection's output itself: its backward writes the gradients of q, k
and v into one tensor.

In place: `inplace=True` overwrites q and k and returns them, but only where that is safe:
when no gradient is recorded (torch.no_grad / inference_mode, or neither input requires
grad: prefill and decode) and both have unit last stride. Under autograd the op always
writes new tensors, since q and k are often views from a split that autograd forbids
modifying in place, and the backward needs none of them.
"""
from __future__ import annotations

import functools

import torch

from kernels.dispatch import tl, triton, use_triton
from kernels.launch import on_device


@functools.lru_cache(maxsize=16)
def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/D), fp32, cached per (head_dim, theta, device): every layer of every step needs it.
    Made outside inference mode, so a first call from the evaluator does not cache an inference tensor."""
    with torch.inference_mode(False):
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rope_cos_sin(position_ids, head_dim: int, theta: float):
    """cos, sin [T, D] in fp32 for the given positions."""
    angle = position_ids.float()[:, None] * inv_freq(head_dim, theta, position_ids.device)[None, :]
    angle = torch.cat((angle, angle), dim=-1)
    return angle.cos(), angle.sin()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_reference(q, k, position_ids, theta: float):
    cos, sin = rope_cos_sin(position_ids, q.shape[-1], theta)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return _rotate(q.float(), cos, sin).to(q.dtype), _rotate(k.float(), cos, sin).to(k.dtype)


def launch_config(n_q_heads: int, n_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_HQ, BLOCK_HKV, BLOCK_HALF, num_warps) for the one-token-per-program kernel."""
    block_hq, block_hkv = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_kv_heads)
    block_half = triton.next_power_of_2(head_dim // 2)
    num_warps = 8 if (block_hq + block_hkv) * block_half >= 2048 else 4
    return block_hq, block_hkv, block_half, num_warps


@triton.jit
def _rotate_heads(X, OUT, stride_xh, stride_oh, n_heads, cos, sin, half, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """Rotates the [n_heads, D] tile of one token: X and OUT point at the token's first head."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x_first = X + heads * stride_xh + dims
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + half, mask=mask, other=0.0).to(tl.float32)
    out_first = OUT + heads * stride_oh + dims
    tl.store(out_first, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_first + half, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, Q_OUT, K_OUT, POS, INV_FREQ, stride_qt, stride_qh, stride_kt, stride_kh, stride_oqt,
                 stride_oqh, stride_okt, stride_okh, n_q_heads, n_kv_heads, half, INVERSE: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    freq = tl.load(INV_FREQ + dims, mask=dims < half, other=0.0)
    angle = (tl.load(POS + t).to(tl.float32) * freq)[None, :]
    cos, sin = tl.cos(angle), tl.sin(angle)
    if INVERSE:
        sin = -sin
    _rotate_heads(Q + t * stride_qt, Q_OUT + t * stride_oqt, stride_qh, stride_oqh, n_q_heads, cos, sin, half,
                  BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K + t * stride_kt, K_OUT + t * stride_okt, stride_kh, stride_okh, n_kv_heads, cos, sin, half,
                  BLOCK_HKV, BLOCK_HALF)


def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


@on_device
def _launch(q, k, q_out, k_out, position_ids, theta, inverse: bool):
    """Writes the rotation (inverse=True: by -angle) of q, k into q_out, k_out (may be q, k)."""
    n_tokens, n_q_heads, head_dim = q.shape
    if k.shape[0] != n_tokens or position_ids.shape != (n_tokens,) or k.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)} and position_ids "
                         f"{tuple(position_ids.shape)} must be [T, Hq, D], [T, Hkv, D] and [T] with D even")
    freq = inv_freq(head_dim, theta, q.device)
    block_hq, block_hkv, block_half, num_warps = launch_config(n_q_heads, k.shape[1], head_dim)
    _rope_kernel[(n_tokens,)](q, k, q_out, k_out, position_ids.contiguous(), freq, q.stride(0), q.stride(1),
                              k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0),
                              k_out.stride(1), n_q_heads, k.shape[1], head_dim // 2, INVERSE=inverse,
                              BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half, num_warps=num_warps)


def _rotated_copy(q, k, position_ids, theta, inverse: bool):
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, q_out, k_out, position_ids, theta, inverse)
    return q_out, k_out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, position_ids, theta):
        ctx.save_for_backward(position_ids)
        ctx.theta = theta
        return _rotated_copy(q, k, position_ids, theta, inverse=False)

    @staticmethod
    def backward(ctx, dq, dk):
        (position_ids,) = ctx.saved_tensors
        dq, dk = _rotated_copy(dq, dk, position_ids, ctx.theta, inverse=True)
        return dq, dk, None, None


def split_heads(qkv, n_q_heads: int, n_kv_heads: int):
    """q [T, Hq, D], k and v [T, Hkv, D]: views of a fused projection's output qkv [T, (Hq + 2 Hkv) D]."""
    heads = qkv.view(qkv.shape[0], n_q_heads + 2 * n_kv_heads, -1)
    return heads[:, :n_q_heads], heads[:, n_q_heads:n_q_heads + n_kv_heads], heads[:, n_q_heads + n_kv_heads:]


class RopeQKVFunction(torch.autograd.Function):
    """(q_rot, k_rot, v) from one fused projection; the backward writes dq, dk (rotated back) and dv
    into one gradient of qkv's shape, so no concatenation of three gradients follows it."""

    @staticmethod
    def forward(ctx, qkv, n_q_heads, n_kv_heads, position_ids, theta):
        ctx.save_for_backward(position_ids)
        ctx.theta, ctx.heads = theta, (n_q_heads, n_kv_heads)
        q, k, v = split_heads(qkv, n_q_heads, n_kv_heads)
        return (*_rotated_copy(q, k, position_ids, theta, inverse=False), v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (position_ids,) = ctx.saved_tensors
        d_qkv = torch.empty((dq.shape[0], dq.shape[1] * dq.shape[2] + 2 * dv.shape[1] * dv.shape[2]),
                            dtype=dq.dtype, device=dq.device)
        d_q, d_k, d_v = split_heads(d_qkv, *ctx.heads)
        _launch(_unit_last_stride(dq), _unit_last_stride(dk), d_q, d_k, position_ids, ctx.theta, inverse=True)
        d_v.copy_(dv)
        return d_qkv, None, None, None, None


def rope_qkv(qkv, n_q_heads: int, n_kv_heads: int, position_ids, theta: float):
    """(q_rot [T, Hq, D], k_rot [T, Hkv, D], v [T, Hkv, D], a view) from a fused projection qkv [T, (Hq + 2 Hkv) D]."""
    if use_triton(qkv):
        return RopeQKVFunction.apply(qkv, n_q_heads, n_kv_heads, position_ids, theta)
    q, k, v = split_heads(qkv, n_q_heads, n_kv_heads)
    return (*rope_reference(q, k, position_ids, theta), v)


def rope(q, k, position_ids, theta: float, inplace: bool = False):
    """(q_rot, k_rot); with inplace=True, q and k themselves where that is safe (module docstring)."""
    records_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    inplace = inplace and not records_grad and q.stride(-1) == 1 and k.stride(-1) == 1
    if use_triton(q):
        if inplace:
            _launch(q, k, q, k, position_ids, theta, inverse=False)
            return q, k
        return RopeFunction.apply(q, k, position_ids, theta)
    q_rot, k_rot = rope_reference(q, k, position_ids, theta)
    if inplace:
        return q.copy_(q_rot), k.copy_(k_rot)
    return q_rot, k_rot
