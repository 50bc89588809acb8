"""Causal self-attention over a packed token stream (varlen), GQA and ALiBi.

q [T, Hq, D], k and v [T, Hkv, D] (Hq a multiple of Hkv: query head h reads KV head
h // (Hq // Hkv)), cu_seqlens [B+1] int32 (sequence b is tokens cu[b]:cu[b+1]),
max_seqlen: the longest sequence (host int), alibi_slopes [Hq] fp32 or None.
Within each sequence: out_i = softmax_j<=i(scale * q_i.k_j + slope * (j - i)) v_j, softmax in
fp32; -> [T, Hq, D] in q's dtype. Tokens of different sequences never attend to each other.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def _sequence_bias(length: int, slopes, causal: bool, device):
    pos = torch.arange(length, device=device)
    rel = (pos[None, :] - pos[:, None]).float()                     # j - i
    bias = slopes.float()[:, None, None] * rel[None] if slopes is not None else rel[None] * 0
    if causal:
        bias = bias.masked_fill(rel[None] > 0, float("-inf"))
    return bias


def attention_reference(q, k, v, cu_seqlens, max_seqlen=None, alibi_slopes=None, causal=True, scale=None):
    """Per-sequence SDPA in fp32 (the CPU path and the tests' reference)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1).float() for t in (q, k, v))
        if alibi_slopes is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=True)
        else:
            bias = _sequence_bias(end - start, alibi_slopes, causal, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


def attention(q, k, v, cu_seqlens, max_seqlen=None, alibi_slopes=None, causal=True, scale=None):
    if use_triton(q):
        raise NotImplementedError("Triton attention lands with the attention issue")
    return attention_reference(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, causal, scale)
