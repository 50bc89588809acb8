"""Padding-free packing: examples -> token-budget batches of concatenated sequences.

Best-fit decreasing puts each example (longest first) into the open batch it fills most tightly.
Examples of equal length are taken in a per-epoch shuffled order, so batch composition changes
between epochs at no cost in efficiency; batches and the sequences inside them are then shuffled
too. Everything is a pure function of (examples, budget_tokens, seed, epoch).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from engine.data import IGNORE, Example
from kernels.attention import cu_seqlens


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [T] int64, the sequences back to back
    position_ids: torch.Tensor   # [T] int64, 0..len-1 within each sequence
    cu_seqlens: torch.Tensor     # [B+1] int32, sequence boundaries in the stream
    max_seqlen: int              # host int, the longest sequence
    labels: torch.Tensor         # [T] int64, aligned with input_ids: -100 on prompts
    target_rows: torch.Tensor | None = None   # [K] int64, the positions that predict a target (prediction_rows)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def shifted_labels(self) -> torch.Tensor:
        """Next-token labels: hidden[t] predicts shifted_labels()[t]; -100 at each sequence's last token."""
        shifted = self.labels.roll(-1)
        shifted[self.cu_seqlens[1:].long() - 1] = IGNORE
        return shifted

    def prediction_rows(self) -> torch.Tensor:
        """The positions t whose next token is a target (shifted_labels()[t] != -100): the only rows the
        output layer and the loss need (a prompt's rows predict nothing that is trained)."""
        return (self.shifted_labels() != IGNORE).nonzero().squeeze(1)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> "PackedBatch":
        return PackedBatch(fn(self.input_ids), fn(self.position_ids), fn(self.cu_seqlens), self.max_seqlen,
                           fn(self.labels), None if self.target_rows is None else fn(self.target_rows))


def collate(examples: list[Example]) -> PackedBatch:
    lengths = [len(example) for example in examples]
    batch = PackedBatch(
        input_ids=torch.tensor([t for example in examples for t in example.input_ids], dtype=torch.int64),
        position_ids=torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]),
        cu_seqlens=cu_seqlens(lengths),
        max_seqlen=max(lengths),
        labels=torch.tensor([t for example in examples for t in example.labels], dtype=torch.int64))
    batch.target_rows = batch.prediction_rows()      # on the host, so a GPU step needs no sync for them
    return batch


def bins_best_fit(lengths: list[int], order: list[int], budget_tokens: int) -> list[list[int]]:
    """Indices grouped into bins of at most budget_tokens; `order` breaks ties between equal lengths."""
    by_length = sorted(order, key=lambda i: -lengths[i])       # stable: ties keep the shuffled order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []                           # (room left, bin index), sorted
    for i in by_length:
        at = bisect.bisect_left(free, (lengths[i], -1))        # the tightest bin the example fits
        if at == len(free):                                    # none: open one, the roomiest
            bins.append([])
            free.append((budget_tokens, len(bins) - 1))
        room, b = free.pop(at)
        bins[b].append(i)
        if room > lengths[i]:
            bisect.insort(free, (room - lengths[i], b))
    return bins


def pack(examples: list[Example], budget_tokens: int, seed: int = 0, epoch: int = 0) -> list[PackedBatch]:
    """Batches of at most budget_tokens tokens, no padding; a pure function of (seed, epoch)."""
    lengths = [len(example) for example in examples]
    too_long = [i for i, n in enumerate(lengths) if n > budget_tokens]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than the {budget_tokens}-token budget (the longest: "
                         f"{max(lengths)} tokens): raise the token budget or select shorter poems")
    rng = random.Random(f"pack:{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    bins = bins_best_fit(lengths, order, budget_tokens)
    for members in bins:
        rng.shuffle(members)
    rng.shuffle(bins)
    return [collate([examples[i] for i in members]) for members in bins]


def packing_efficiency(batches: list[PackedBatch], budget_tokens: int) -> float:
    """Tokens / (batches * budget): the share of the budgeted compute that holds real tokens."""
    return sum(batch.num_tokens for batch in batches) / (len(batches) * budget_tokens) if batches else 0.0
