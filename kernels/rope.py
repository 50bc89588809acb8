"""Rotary position embedding, NeoX half-rotation layout (Qwen2).

q [T, Hq, D], k [T, Hkv, D] packed tokens, position_ids [T] (restarting at 0 per sequence),
theta: the base. With inv_freq_i = theta^(-2i/D) and angle = pos * inv_freq (fp32):
    out = x * cos(angle ++ angle) + rotate_half(x) * sin(angle ++ angle),
    rotate_half(x) = (-x[D/2:], x[:D/2]).
Returns (q_rot, k_rot) in the input dtype.
"""
from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
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


def rope(q, k, position_ids, theta: float):
    if use_triton(q):
        raise NotImplementedError("Triton rope lands with the kernels issue")
    return rope_reference(q, k, position_ids, theta)
