"""One AdamW step over many tensors, exactly as torch.optim.AdamW computes it.

masters, exp_avgs, exp_avg_sqs: lists of fp32 tensors (updated in place); grads: the matching
gradients (any float dtype); params: the model's tensors that receive the new values (bf16
weights on GPU) or None when the masters are the model's own tensors. `step` is the number of
this update (1 for the first), a Python int; lr, betas, eps and weight_decay are Python floats.
For each tensor:
    p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Triton path: one elementwise kernel reads g (any dtype), p, m, v (fp32) once and writes p, m,
v and the model's copy of p (rounded to its dtype) once: 28 bytes per element with bf16 grads
and params, the minimum. The bias corrections are computed on the host from `step`, so the
step never synchronizes. Options that fold the optimizer phase's other passes into this one:
`grad_scale` (a 1-element fp32 device tensor, e.g. the clipping factor) multiplies every gradient
as it is read (g = g * scale, the product clip_grad_norm_ would have stored), and `zero_grads`
writes zeros over the gradients after reading them (the next step's accumulator), so clipping,
update and zeroing are one pass: 30 bytes per element with fp32 gradients, bf16 params (see
`bytes_per_element`). One launch per tensor: the optimizer keeps each parameter group in
one flat buffer (one launch for ~500M elements); a list of many small tensors works too, at
one launch each. Every tensor must be contiguous and match its master's size.
"""
from __future__ import annotations

import math

import torch

from kernels.dispatch import INTERPRETING, tl, triton, use_triton
from kernels.launch import on_device


def bytes_per_element(grad_bytes: int, param_bytes: int | None, zero_grads: bool) -> int:
    """Memory traffic of one fused step per element: g read (and zeroed), master, m, v read and written,
    the model's copy written (param_bytes; None: the masters are the model's tensors)."""
    return grad_bytes * (2 if zero_grads else 1) + 3 * 2 * 4 + (param_bytes or 0)


def adamw_step_reference(masters, grads, exp_avgs, exp_avg_sqs, params=None, *, step: int, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale=None,
                         zero_grads: bool = False):
    originals = grads
    grads = [g.float() for g in grads]
    if grad_scale is not None:
        grads = torch._foreach_mul(grads, grad_scale.reshape(()))
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
    if zero_grads:
        torch._foreach_zero_(originals)


def adamw_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for _adamw_kernel over n elements."""
    if INTERPRETING:  # the interpreter pays per program: few, large ones
        return min(triton.next_power_of_2(n), 1 << 16), 4
    # 8 fp32 per thread: two 16-byte loads per stream (16 per thread spilled on sm_80 with the scale
    # and zeroing folded in, int64 offsets)
    return 2048, 8


@triton.jit
def _adamw_kernel(P, G, M, VSQ, OUT, SCALE, n, decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                  bias_correction2_sqrt, eps, WRITE_OUT: tl.constexpr, HAS_SCALE: tl.constexpr,
                  ZERO_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(P + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(SCALE)
    if ZERO_GRAD:
        tl.store(G + offs, tl.zeros([BLOCK], tl.float32).to(G.dtype.element_ty), mask=mask)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(VSQ + offs, mask=mask, other=0.0)
    # the same operations in the same order as torch's single-tensor AdamW (lerp with weight < 0.5)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    # IEEE-rounded sqrt and division, as torch's: tl.sqrt and `/` compile to sqrt.approx.f32 and
    # div.full.f32 on the GPU, which differ from torch in the last bits
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + -step_size * tl.div_rn(m, denom)
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(VSQ + offs, v, mask=mask)
    if WRITE_OUT:
        tl.store(OUT + offs, p.to(OUT.dtype.element_ty), mask=mask)


def _check(master, grad, exp_avg, exp_avg_sq, param):
    tensors = [t for t in (master, grad, exp_avg, exp_avg_sq, param) if t is not None]
    if master.dtype != torch.float32 or exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError(f"adamw_step: masters and moments must be fp32, got {master.dtype}, {exp_avg.dtype}, "
                         f"{exp_avg_sq.dtype}")
    if any(t.numel() != master.numel() or not t.is_contiguous() for t in tensors):
        raise ValueError(f"adamw_step: every tensor must be contiguous with {master.numel()} elements like its "
                         f"master, got {[(tuple(t.shape), t.is_contiguous()) for t in tensors]}")


@on_device
def adamw_step_triton(masters, grads, exp_avgs, exp_avg_sqs, params=None, *, step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale=None,
                      zero_grads: bool = False):
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    scalars = (1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1 ** step),
               bias_correction2_sqrt, eps)
    for i, master in enumerate(masters):
        param = None if params is None else params[i]
        _check(master, grads[i], exp_avgs[i], exp_avg_sqs[i], param)
        n = master.numel()
        if n == 0:
            continue
        block, num_warps = adamw_config(n)
        _adamw_kernel[(triton.cdiv(n, block),)](master, grads[i], exp_avgs[i], exp_avg_sqs[i],
                                                master if param is None else param,
                                                master if grad_scale is None else grad_scale, n, *scalars,
                                                WRITE_OUT=param is not None, HAS_SCALE=grad_scale is not None,
                                                ZERO_GRAD=zero_grads, BLOCK=block, num_warps=num_warps)


def adamw_step(masters, grads, exp_avgs, exp_avg_sqs, params=None, **hyper):
    if masters and use_triton(masters[0]):
        adamw_step_triton(masters, grads, exp_avgs, exp_avg_sqs, params, **hyper)
    else:
        adamw_step_reference(masters, grads, exp_avgs, exp_avg_sqs, params, **hyper)
