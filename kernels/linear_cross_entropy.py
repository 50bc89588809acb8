"""Output layer fused with cross-entropy: the logits are never materialized whole.

hidden [T, H], weight [V, H] (the output matrix, tied or not), labels [T] int64 with
ignore_index (-100) on tokens that carry no loss. loss_t = logsumexp(hidden_t . W^T) -
hidden_t . W[labels_t], computed in fp32. reduction "mean": sum over valid tokens / their
count; "sum": the sum (the training loop divides by a global token count).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean"):
    logits = hidden.float() @ weight.float().t()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean"):
    if use_triton(hidden):
        raise NotImplementedError("Triton linear_cross_entropy lands with the kernels issue")
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction)
