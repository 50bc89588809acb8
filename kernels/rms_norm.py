"""RMSNorm (Qwen2): y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32.

x [..., H] (fp32 or bf16), weight [H] -> y like x (torch's type promotion of x and weight).
The normalized value is cast back to x's dtype before the weight multiply, as transformers
does. With `residual`, the sum s = x + residual (in x's dtype) is normalized and returned
too: (y, s); the Triton path fuses the add into the norm kernel and writes s once.

Triton path: one program per row computes rstd = 1 / sqrt(mean(s^2) + eps) in fp32 and keeps
it ([rows] fp32) for the backward. With n = s * rstd, g = dy * weight (fp32):
    ds = rstd * (g - n * mean(g * n)) (+ the gradient flowing into the returned sum),
    dx = dresidual = ds,  dweight = sum over rows of dy * cast(n).
The backward runs a fixed number of programs (a few per SM on a GPU), each looping over a
contiguous chunk of rows, several rows per iteration (kernels.launch.backward_rows: their loads in
flight together, not one row's latency after another), and writing its fp32 partial dweight row; a torch sum reduces them
(no atomics, so bf16 weights are fine).
"""
from __future__ import annotations

import torch

from kernels.dispatch import tl, triton, use_triton
from kernels.launch import as_rows, backward_rows, on_device, partial_programs, row_config


def rms_norm_reference(x, weight, eps: float):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@triton.jit
def _rms_norm_forward_kernel(X, R, S, W, Y, RSTD, stride_x, stride_r, stride_s, stride_y, n_cols, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = s.to(S.dtype.element_ty)  # the sum is rounded to x's dtype, as `x + residual` is
        tl.store(S + row * stride_s + cols, s, mask=mask)
        s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (s * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(DY, DS_OUT, S, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_dso, stride_s, stride_dx,
                              n_rows, n_cols, rows_per_program,
                              HAS_DS_OUT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 row offsets: rows * stride may pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, ROWS):   # a [ROWS, BLOCK] tile per iteration
        rows = first + tl.arange(0, ROWS)
        row_mask = rows < row_end
        tile_mask = row_mask[:, None] & mask[None, :]
        s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        n = s * rstd
        dw += tl.sum(dy * n.to(S.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        ds = rstd * (g - n * (tl.sum(g * n, axis=1) / n_cols)[:, None])
        if HAS_DS_OUT:
            ds += tl.load(DS_OUT + rows[:, None] * stride_dso + cols[None, :], mask=tile_mask,
                          other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], ds.to(DX.dtype.element_ty), mask=tile_mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


@on_device
def _forward(x, weight, eps, residual):
    """Returns y, s (the normalized input: x + residual, or x itself) and rstd [rows] fp32."""
    x2 = as_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is None:
        r2 = s = x2
    else:
        r2 = as_rows(residual)
        s = torch.empty_like(x2, memory_format=torch.contiguous_format)
    block, num_warps = row_config(n_cols)
    _rms_norm_forward_kernel[(n_rows,)](x2, r2, s, weight, y, rstd, x2.stride(0), r2.stride(0), s.stride(0),
                                        y.stride(0), n_cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                        num_warps=num_warps)
    return y, s, rstd


@on_device
def _backward(dy, ds_out, s, weight, rstd):
    """dx (= dresidual) [rows, H] in s's dtype and dweight in weight's dtype."""
    dy2 = as_rows(dy)
    n_rows, n_cols = s.shape
    dso = dy2 if ds_out is None else as_rows(ds_out)
    dx = torch.empty_like(s, memory_format=torch.contiguous_format)
    block, num_warps = row_config(n_cols)
    rows = backward_rows(block)
    programs, rows_per_program = partial_programs(n_rows, s, rows)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=s.device)
    _rms_norm_backward_kernel[(programs,)](dy2, dso, s, weight, rstd, dx, dw_partial, dy2.stride(0), dso.stride(0),
                                           s.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
                                           HAS_DS_OUT=ds_out is not None, BLOCK=block, ROWS=rows, num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        y, s, rstd = _forward(x, weight, eps, residual)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape, ctx.has_residual = x.shape, residual is not None
        ctx.set_materialize_grads(False)
        if residual is None:
            return y.view(x.shape)
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(ctx.shape, dtype=s.dtype, device=s.device)
        dx, dweight = _backward(dy, ds_out, s, weight, rstd)
        dx = dx.view(ctx.shape)
        return dx, dweight, None, dx if ctx.has_residual else None


def rms_norm(x, weight, eps: float, residual=None):
    """y, or (y, x + residual) when residual is given; see the module docstring."""
    if use_triton(x):
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
                             f"x {tuple(x.shape)} {x.dtype} for the fused add")
        return RMSNormFunction.apply(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
        return rms_norm_reference(x, weight, eps), x
    return rms_norm_reference(x, weight, eps)
