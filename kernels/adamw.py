"""One AdamW step over many tensors, exactly as torch.optim.AdamW computes it.

masters, exp_avgs, exp_avg_sqs: lists of fp32 tensors (updated in place); grads: the matching
gradients (any float dtype); params: the model's tensors that receive the new values (bf16
weights on GPU) or None when the masters are the model's own tensors. For each tensor:
    p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""
from __future__ import annotations

import math

import torch

from kernels.dispatch import use_triton


def adamw_step_reference(masters, grads, exp_avgs, exp_avg_sqs, params=None, *, step: int, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float):
    grads = [g.float() for g in grads]
    if weight_decay:
        torch._foreach_mul_(masters, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(masters, exp_avgs, denom, value=-step_size)
    if params is not None:
        torch._foreach_copy_(params, masters)


def adamw_step(masters, grads, exp_avgs, exp_avg_sqs, params=None, **hyper):
    if masters and use_triton(masters[0]):
        raise NotImplementedError("Triton adamw lands with the kernels issue")
    adamw_step_reference(masters, grads, exp_avgs, exp_avg_sqs, params, **hyper)
