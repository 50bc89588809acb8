"""What both families share: the packed-batch attention context, the KV cache, and the
CausalLM base class (packed forward, output layer, fused loss, save_pretrained).

A forward pass sees one packed token stream, never padding. Three modes, one code path:
  training / scoring   cu_seqlens given, no cache: varlen causal attention;
  prefill              cu_seqlens and a cache given: the sequences' keys and values are
                       written to their cache slots, then varlen attention;
  decode               a cache and no cu_seqlens: one token per live sequence, written to
                       its slot at its position, then attention over the cached tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention import attention
from kernels.decode_attention import decode_attention
from kernels.layer_norm import layer_norm
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.rms_norm import rms_norm
from models.config import ModelConfig


class KVCache:
    """Preallocated keys and values, per layer [slots, Hkv, max_len, D] (see kernels/decode_attention.py).
    Zeroed, not empty: the torch decode reference multiplies the zero weights of rows past a
    sequence's length by their values, and garbage NaNs there would poison its output."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device=None, dtype=torch.float32):
        shape = (slots, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


@dataclass
class AttentionContext:
    position_ids: torch.Tensor                 # [T]
    cu_seqlens: torch.Tensor | None = None     # [B+1] int32; None in decode
    max_seqlen: int | None = None
    cache: KVCache | None = None
    token_slots: torch.Tensor | None = None    # [T] cache slot of each token (prefill, decode)
    slot_ids: torch.Tensor | None = None       # [B] cache slot of each sequence (decode)
    cache_seqlens: torch.Tensor | None = None  # [B] int32 cached tokens, the new one included (decode)

    @property
    def decode(self) -> bool:
        return self.cache is not None and self.cu_seqlens is None


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """0..len-1 within each sequence, computed on the device without a host sync."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)


def make_context(input_ids, cu_seqlens=None, position_ids=None, max_seqlen=None, cache=None, slot_ids=None):
    total = input_ids.shape[0]
    if cache is not None and cu_seqlens is None:                       # decode: one token per sequence
        if position_ids is None or slot_ids is None:
            raise ValueError("a decode step needs position_ids and slot_ids for its cached sequences")
        return AttentionContext(position_ids, cache=cache, token_slots=slot_ids, slot_ids=slot_ids,
                                cache_seqlens=(position_ids + 1).to(torch.int32))
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=input_ids.device)
    if position_ids is None:
        position_ids = positions_from_cu_seqlens(cu_seqlens, total)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())     # host sync: pass it to avoid
    token_slots = None
    if cache is not None:
        slot_ids = slot_ids if slot_ids is not None else torch.arange(len(cu_seqlens) - 1, device=input_ids.device)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        token_slots = torch.repeat_interleave(slot_ids, lengths, output_size=total)
    return AttentionContext(position_ids, cu_seqlens, max_seqlen, cache, token_slots, slot_ids)


def attend(q, k, v, layer: int, ctx: AttentionContext, alibi_slopes=None):
    """q [T, Hq, D], k and v [T, Hkv, D] of one layer -> [T, Hq, D], writing the cache if any."""
    if ctx.cache is not None:
        ctx.cache.k[layer][ctx.token_slots, :, ctx.position_ids] = k
        ctx.cache.v[layer][ctx.token_slots, :, ctx.position_ids] = v
        if ctx.decode:
            return decode_attention(q, ctx.cache.k[layer], ctx.cache.v[layer], ctx.cache_seqlens, ctx.slot_ids,
                                    alibi_slopes)
    return attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, alibi_slopes)


class CausalLM(nn.Module):
    """Base of both families: subclasses define `hidden_states` and `output_weight`."""

    config: ModelConfig

    def hidden_states(self, input_ids, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError

    def output_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids, cu_seqlens=None, position_ids=None, max_seqlen=None, cache=None, slot_ids=None,
                return_hidden: bool = False):
        """input_ids [T] int64, cu_seqlens [B+1] int32 -> logits [T, V] (or the final hidden states [T, H])."""
        ctx = make_context(input_ids, cu_seqlens, position_ids, max_seqlen, cache, slot_ids)
        hidden = self.hidden_states(input_ids, ctx)
        return hidden if return_hidden else self.logits(hidden)

    def logits(self, hidden):
        return hidden @ self.output_weight().t()

    def loss(self, input_ids, labels, cu_seqlens, position_ids=None, max_seqlen=None, reduction="mean"):
        """Cross-entropy of next-token predictions: labels[t] is the token to predict at position t
        (-100: none), already shifted within each sequence. The logits are never materialized."""
        hidden = self(input_ids, cu_seqlens, position_ids, max_seqlen, return_hidden=True)
        return linear_cross_entropy(hidden, self.output_weight(), labels, reduction=reduction)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, out_dir, tokenizer=None) -> None:
        from models.weights import save_pretrained
        save_pretrained(self, out_dir, tokenizer)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x, residual=None):
        """norm(x), or with `residual`: (norm(x + residual), x + residual) in one pass."""
        return rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """transformers' initialization: normal(0, std) matrices and embeddings, zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, (RMSNorm, LayerNorm)):
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
            nn.init.zeros_(module.bias)
