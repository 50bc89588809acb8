"""LayerNorm (BLOOM): y = (x - mean) / sqrt(var + eps) * weight + bias, statistics in fp32.

x [..., H] (fp32 or bf16), weight and bias [H] -> y like x (computed in fp32, cast once). With
`residual`, the sum s = x + residual (in x's dtype) is normalized and returned too: (y, s); the
Triton path fuses the add into the norm kernel and writes s once (BLOOM's residual stream, as
rms_norm's for Qwen2), and its backward adds the gradient flowing into the returned sum.

Triton path: one program per row keeps mean and rstd ([rows] fp32 each) for the backward.
With xhat = (s - mean) * rstd and g = dy * weight (fp32):
    ds = rstd * (g - xhat * mean(g * xhat) - mean(g)) (+ the returned sum's gradient), dx = dresidual = ds,
    dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy,
reduced like rms_norm's dweight: per-program fp32 partial rows (several rows per iteration), then a
torch sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import tl, triton, use_triton
from kernels.launch import as_rows, backward_rows, on_device, partial_programs, row_config


def layer_norm_reference(x, weight, bias, eps: float):
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


@triton.jit
def _layer_norm_forward_kernel(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_cols, eps,
                               HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(S.dtype.element_ty)  # the sum is rounded to x's dtype, as `x + residual` is
        tl.store(S + row * stride_s + cols, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (centered * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso,
                                stride_x, stride_dx, n_rows, n_cols, rows_per_program,
                                HAS_DS_OUT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 row offsets: rows * stride may pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, ROWS):   # a [ROWS, BLOCK] tile per iteration
        rows = first + tl.arange(0, ROWS)
        row_mask = rows < row_end
        tile_mask = row_mask[:, None] & mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
        xhat = tl.where(tile_mask, (x - mean) * rstd, 0.0)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        g = dy * w[None, :]
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None] - (tl.sum(g, axis=1) / n_cols)[:, None])
        if HAS_DS_OUT:
            dx += tl.load(DS_OUT + rows[:, None] * stride_dso + cols[None, :], mask=tile_mask,
                          other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=tile_mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)
    tl.store(DB_PARTIAL + pid * n_cols + cols, db, mask=mask)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    @on_device
    def forward(ctx, x, weight, bias, eps, residual):
        x2 = as_rows(x)
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        if residual is None:
            r2 = s = x2
        else:
            r2 = as_rows(residual)
            s = torch.empty_like(x2, memory_format=torch.contiguous_format)
        block, num_warps = row_config(n_cols)
        _layer_norm_forward_kernel[(n_rows,)](x2, r2, s, weight, bias, y, mean, rstd, x2.stride(0), r2.stride(0),
                                              s.stride(0), y.stride(0), n_cols, eps,
                                              HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.bias_dtype, ctx.shape, ctx.has_residual = bias.dtype, x.shape, residual is not None
        ctx.set_materialize_grads(False)
        if residual is None:
            return y.view(x.shape)
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    @on_device
    def backward(ctx, dy, ds_out=None):
        s, weight, mean, rstd = ctx.saved_tensors
        dy2 = as_rows(dy) if dy is not None else torch.zeros_like(s)
        dso = dy2 if ds_out is None else as_rows(ds_out)
        n_rows, n_cols = s.shape
        dx = torch.empty_like(s, memory_format=torch.contiguous_format)
        block, num_warps = row_config(n_cols)
        rows = backward_rows(block)
        programs, rows_per_program = partial_programs(n_rows, s, rows)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=s.device)
        db_partial = torch.empty_like(dw_partial)
        _layer_norm_backward_kernel[(programs,)](dy2, dso, s, weight, mean, rstd, dx, dw_partial, db_partial,
                                                 dy2.stride(0), dso.stride(0), s.stride(0), dx.stride(0), n_rows,
                                                 n_cols, rows_per_program, HAS_DS_OUT=ds_out is not None,
                                                 BLOCK=block, ROWS=rows, num_warps=num_warps)
        dweight = dw_partial.sum(0).to(weight.dtype)
        dbias = db_partial.sum(0).to(ctx.bias_dtype)
        dx = dx.view(ctx.shape)
        return dx, dweight, dbias, None, dx if ctx.has_residual else None


def layer_norm(x, weight, bias, eps: float, residual=None):
    """y, or (y, x + residual) when residual is given; see the module docstring."""
    if use_triton(x):
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
            raise ValueError(f"layer_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
                             f"x {tuple(x.shape)} {x.dtype} for the fused add")
        return LayerNormFunction.apply(x, weight, bias, eps, residual)
    if residual is not None:
        x = x + residual
        return layer_norm_reference(x, weight, bias, eps), x
    return layer_norm_reference(x, weight, bias, eps)
