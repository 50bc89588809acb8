"""Bits memorized: how much information about its training poems a model has absorbed.

A poem's information under a model is the negative log-likelihood of its target tokens (the
poem and the token that ends it) given its prompt, in bits:
    bits(poem) = sum_t -log2 p(target_t | prompt, target_<t)
scored with one forward pass over packed batches (no generation), the logits never whole: the
fused loss (kernels/linear_cross_entropy.py, reduction "none") gives each token's fp32 loss.
Under the base model, the sum over the training poems is the data's information, and
    bits gained = sum over poems of (bits under the base model - bits under the trained one)
is at most that (a trained model's NLL is >= 0). It counts all the model learned about these
token sequences, their shared format included, so it is quoted beside exact recitation: per
parameter (beside the ~2-3.6 bits/parameter capacity measured for GPT-style models) and per
memorized poem.
"""
from __future__ import annotations

import math

import torch

from engine.data import IGNORE, Example
from engine.packing import bins_best_fit, collate
from kernels.linear_cross_entropy import linear_cross_entropy

SCORE_BATCH_TOKENS = 8192       # tokens per scoring forward (raised to the longest example)


@torch.no_grad()
def poem_bits(model, examples: list[Example], batch_tokens: int = SCORE_BATCH_TOKENS) -> list[float]:
    """Each example's target NLL in bits, in the examples' order: one forward per packed batch."""
    if not examples:
        return []
    was_training = model.training
    model.eval()
    device = model.device
    lengths = [len(e) for e in examples]
    totals = torch.zeros(len(examples), dtype=torch.float64, device=device)
    for indices in bins_best_fit(lengths, list(range(len(examples))), max(batch_tokens, max(lengths))):
        batch = collate([examples[i] for i in indices]).to(device)
        hidden = model(batch.input_ids, batch.cu_seqlens, batch.position_ids, batch.max_seqlen, return_hidden=True)
        nats = linear_cross_entropy(hidden, model.output_weight(), batch.shifted_labels(), IGNORE, reduction="none")
        owner = torch.tensor(indices, device=device).repeat_interleave(
            torch.tensor([lengths[i] for i in indices], device=device))
        totals.index_add_(0, owner, nats.double())    # ignored (prompt) tokens add 0
    model.train(was_training)
    return (totals / math.log(2)).tolist()


def bits_summary(base_bits: list[float], trained_bits: list[float], parameters: int, memorized: int) -> dict:
    """The information view of a run: base information, bits gained, per parameter and per memorized poem.

    base_bits / trained_bits: poem_bits of the same poems under the base and the trained model;
    memorized: how many of them the trained model recites exactly.
    """
    if len(base_bits) != len(trained_bits):
        raise ValueError(f"{len(base_bits)} base scores and {len(trained_bits)} trained scores: score the same poems")
    base, trained = sum(base_bits), sum(trained_bits)
    gained = base - trained
    return {
        "base_bits": base,
        "trained_bits": trained,
        "bits_gained": gained,
        "bits_gained_share": gained / base if base else 0.0,
        "bits_per_parameter": gained / parameters if parameters else None,
        "bits_per_memorized_poem": gained / memorized if memorized else None,
    }
