"""One new query per sequence against its KV cache (the decode step of greedy generation).

KV-cache layout (per layer): k_cache, v_cache [slots, Hkv, S_max, D]: each (slot, KV head)
holds its keys contiguously, so a decode step streams one dense [len, D] block per head, and
all the query heads of a GQA group share that read.

q [B, Hq, D]: the query of each live sequence (already holding its own k, v in the cache);
cache_seqlens [B] int32: valid cached tokens of each sequence, the current one included;
slot_ids [B] or None: the cache slot of each live sequence (None: slot b for sequence b), so
finished sequences can leave the batch without moving any cache;
alibi_slopes [Hq] or None: bias slope * (j - i) with i = cache_seqlens - 1.
-> [B, Hq, D] in q's dtype, softmax in fp32.
"""
from __future__ import annotations

import math

import torch

from kernels.dispatch import use_triton


def decode_attention_reference(q, k_cache, v_cache, cache_seqlens, slot_ids=None, alibi_slopes=None, scale=None):
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if slot_ids is None:
        slot_ids = torch.arange(batch, device=q.device)
    span = int(cache_seqlens.max()) if batch else 0
    k = k_cache[slot_ids, :, :span].float()                          # [B, Hkv, S, D]
    v = v_cache[slot_ids, :, :span].float()
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


def decode_attention(q, k_cache, v_cache, cache_seqlens, slot_ids=None, alibi_slopes=None, scale=None):
    if use_triton(q):
        raise NotImplementedError("Triton decode attention lands with the attention issue")
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, slot_ids, alibi_slopes, scale)
