"""What both families share: the attention context of a forward pass, the KV cache, and the
CausalLM base class (packed forward, prefill, decode step, output layer, fused loss, save_pretrained).

A forward pass sees one packed token stream, never padding, in one of three modes, each with
its own entry point and AttentionContext constructor:
  packed    model(ids, cu_seqlens)            training / scoring: varlen causal attention;
  prefill   model.prefill(ids, cu, cache, slot_ids)
                                              the sequences' keys and values are written to
                                              their cache slots, then varlen attention;
  decode    model.decode_step(ids, positions, cache, slot_ids)
                                              one token per live sequence, written to its slot
                                              at its position, then attention over the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from kernels.attention import attention
from kernels.attention import cu_seqlens as cu_seqlens_from_lengths
from kernels.decode_attention import decode_attention
from kernels.layer_norm import layer_norm
from kernels.linear_cross_entropy import linear_cross_entropy, mm_fp32
from kernels.rms_norm import rms_norm
from models.config import ModelConfig
from models.weights import save_pretrained

ARGMAX_TILE_BYTES = 64 << 20      # fp32 logits tile of the greedy pick: 2,048 rows x 8,192 columns
ARGMAX_MIN_COLUMNS = 1024         # vocabulary columns per tile at least (more rows: fewer rows per tile)
UPCAST_TILE_BYTES = 32 << 20      # fp32 copy of a bf16 weight tile on the CPU (a larger one costs page faults)


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


@dataclass(frozen=True)
class AttentionContext:
    """How the tokens of one forward pass attend; built by .packed, .prefill or .decode."""
    position_ids: torch.Tensor                 # [T]
    cu_seqlens: torch.Tensor | None = None     # [B+1] int32 (packed, prefill)
    max_seqlen: int | None = None              # (packed, prefill)
    cache: KVCache | None = None               # (prefill, decode)
    token_slots: torch.Tensor | None = None    # [T] cache slot of each token (prefill, decode)
    slot_ids: torch.Tensor | None = None       # [B] cache slot of each sequence (prefill, decode)
    cache_seqlens: torch.Tensor | None = None  # [B] int32 cached tokens, the new one included (decode)

    @classmethod
    def packed(cls, cu_seqlens, num_tokens: int, position_ids=None, max_seqlen: int | None = None):
        """Varlen causal attention within each sequence of cu_seqlens. position_ids default to
        0..len-1 per sequence; max_seqlen, when not given, costs a host sync."""
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, num_tokens)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(position_ids, cu_seqlens, max_seqlen)

    @classmethod
    def prefill(cls, cu_seqlens, num_tokens: int, cache: KVCache, slot_ids, max_seqlen: int | None = None):
        """Packed attention over whole prompts (positions from 0) whose keys and values also go to
        cache slot slot_ids[b] of sequence b."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        token_slots = torch.repeat_interleave(slot_ids, lengths, output_size=num_tokens)
        return replace(cls.packed(cu_seqlens, num_tokens, max_seqlen=max_seqlen),
                       cache=cache, token_slots=token_slots, slot_ids=slot_ids)

    @classmethod
    def decode(cls, position_ids, cache: KVCache, slot_ids):
        """One new token per sequence at position_ids[b] of cache slot slot_ids[b]; it attends to
        the cached tokens 0..position_ids[b]."""
        return cls(position_ids, cache=cache, token_slots=slot_ids, slot_ids=slot_ids,
                   cache_seqlens=(position_ids + 1).to(torch.int32))

    @property
    def is_decode(self) -> bool:
        return self.cache_seqlens is not None


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """0..len-1 within each sequence, computed on the device without a host sync."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)


def attend(q, k, v, layer: int, ctx: AttentionContext, alibi_slopes=None):
    """q [T, Hq, D], k and v [T, Hkv, D] of one layer -> [T, Hq, D], writing the cache if any."""
    if ctx.cache is not None:
        ctx.cache.k[layer][ctx.token_slots, :, ctx.position_ids] = k
        ctx.cache.v[layer][ctx.token_slots, :, ctx.position_ids] = v
        if ctx.is_decode:
            return decode_attention(q, ctx.cache.k[layer], ctx.cache.v[layer], ctx.cache_seqlens, ctx.slot_ids,
                                    alibi_slopes)
    return attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, alibi_slopes)


class CausalLM(nn.Module):
    """Base of both families: subclasses define `hidden_states` and `output_weight`.

    Each entry point returns logits [T, V], or with return_hidden=True the final hidden states
    [T, H] (for the fused loss or `greedy_tokens`).
    """

    config: ModelConfig

    def hidden_states(self, input_ids, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError

    def output_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids, cu_seqlens=None, position_ids=None, max_seqlen=None, *, return_hidden: bool = False):
        """Packed training / scoring forward: input_ids [T] int64, cu_seqlens [B+1] int32 (None: one
        sequence) -> logits [T, V]. No cache."""
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_from_lengths([input_ids.shape[0]], input_ids.device)
        ctx = AttentionContext.packed(cu_seqlens, input_ids.shape[0], position_ids, max_seqlen)
        return self.run(input_ids, ctx, return_hidden)

    def prefill(self, input_ids, cu_seqlens, cache: KVCache, slot_ids, *, max_seqlen=None,
                return_hidden: bool = False):
        """Whole prompts, packed: input_ids [T], cu_seqlens [B+1] -> [T, V]; prompt b's keys and
        values are written to cache slot slot_ids[b] at positions 0..len-1."""
        ctx = AttentionContext.prefill(cu_seqlens, input_ids.shape[0], cache, slot_ids, max_seqlen)
        return self.run(input_ids, ctx, return_hidden)

    def decode_step(self, input_ids, position_ids, cache: KVCache, slot_ids, *, return_hidden: bool = False):
        """One token per sequence: input_ids, position_ids, slot_ids [B] -> [B, V], attending to its
        cache slot's tokens 0..position_ids[b] (this one included, written there first)."""
        return self.run(input_ids, AttentionContext.decode(position_ids, cache, slot_ids), return_hidden)

    def run(self, input_ids, ctx: AttentionContext, return_hidden: bool):
        hidden = self.hidden_states(input_ids, ctx)
        return hidden if return_hidden else self.logits(hidden)

    def logits(self, hidden):
        return hidden @ self.output_weight().t()

    def greedy_tokens(self, hidden) -> torch.Tensor:
        """hidden [N, H] -> [N] int64: the argmax of the fp32 logits, never materialized whole."""
        return greedy_tokens(hidden, self.output_weight())

    def loss(self, input_ids, labels, cu_seqlens, position_ids=None, max_seqlen=None, reduction="mean",
             target_rows=None):
        """Cross-entropy of next-token predictions: labels[t] is the token to predict at position t
        (-100: none), already shifted within each sequence. The logits are never materialized.
        target_rows (int64 [K], e.g. PackedBatch.target_rows: the positions whose label is not -100): the
        output layer and the loss run on those rows only; the others (a prompt's) contribute nothing
        either way, so the result is the same, for a fraction of the output layer's FLOPs and bytes."""
        hidden = self(input_ids, cu_seqlens, position_ids, max_seqlen, return_hidden=True)
        if target_rows is not None and len(target_rows):   # none (an idle micro-batch): every row, none trained
            hidden, labels = hidden.index_select(0, target_rows), labels.index_select(0, target_rows)
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
        save_pretrained(self, out_dir, tokenizer)


def greedy_tokens(hidden, weight, tile_bytes: int = ARGMAX_TILE_BYTES) -> torch.Tensor:
    """argmax over v of the fp32 logits hidden @ weight[v] -> [N] int64, the index torch.argmax
    of the whole [N, V] fp32 logits would give (first on ties, NaN counts as largest).

    Why fp32: a memorized token's logit is ~30, where bf16 spacing is 0.125, so bf16 logits
    turn near-ties into exact ties (or flip them) and a recitation that fp32 gets right fails.
    The logits exist one tile of at most tile_bytes at a time (rows x vocabulary columns, a
    running max over the column tiles): static shapes and no host sync, so a CUDA graph can
    hold it. bf16 products are exact in fp32, so only the accumulation order differs from fp64.
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    if rows == 0:
        return torch.zeros(0, dtype=torch.int64, device=hidden.device)
    columns = min(vocab, max(ARGMAX_MIN_COLUMNS, tile_bytes // (4 * rows) // 128 * 128))
    if not hidden.is_cuda and weight.dtype != torch.float32:
        # CPU BLAS has no bf16 x bf16 -> fp32 GEMM: each weight tile is upcast, a bounded copy
        columns = min(columns, max(ARGMAX_MIN_COLUMNS, UPCAST_TILE_BYTES // (4 * weight.shape[1]) // 128 * 128))
        hidden = hidden.float()
    row_step = max(1, tile_bytes // (4 * columns))
    picks = [argmax_over_column_tiles(hidden[r:r + row_step], weight, columns) for r in range(0, rows, row_step)]
    return picks[0] if len(picks) == 1 else torch.cat(picks)


def argmax_over_column_tiles(hidden, weight, columns: int) -> torch.Tensor:
    best_value = best_index = None
    for lo in range(0, weight.shape[0], columns):
        logits = mm_fp32(hidden, weight[lo:lo + columns].t())
        index = logits.argmax(-1, keepdim=True)
        value = logits.gather(-1, index)
        index += lo
        if best_value is None:
            best_value, best_index = value, index
            continue
        # strictly greater: an earlier tile keeps a tie, as torch.argmax keeps the first index
        wins = (value > best_value) | (value.isnan() & ~best_value.isnan())
        best_value, best_index = torch.where(wins, value, best_value), torch.where(wins, index, best_index)
    return best_index.squeeze(-1)


class FusedLinear(nn.Linear):
    """One GEMM for several projections of the same input: the weight (and bias) is theirs stacked by rows
    in `checkpoint_parts` order ({name: out_features}, sibling module names in a checkpoint). Checkpoints
    keep each part under its own name: models/weights.py splits and joins the rows."""

    def __init__(self, in_features: int, checkpoint_parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(checkpoint_parts.values()), bias=bias)
        self.checkpoint_parts = dict(checkpoint_parts)


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

    def forward(self, x, residual=None):
        """norm(x), or with `residual`: (norm(x + residual), x + residual) in one pass."""
        return layer_norm(x, self.weight, self.bias, self.eps, residual)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """transformers' initialization: normal(0, std) matrices and embeddings, zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, (RMSNorm, LayerNorm)):
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
            nn.init.zeros_(module.bias)
