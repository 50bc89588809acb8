"""LayerNorm (BLOOM): y = (x - mean) / sqrt(var + eps) * weight + bias, statistics in fp32.

x [..., H] (fp32 or bf16), weight and bias [H] -> y like x (computed in fp32, cast once).

Triton path: one program per row keeps mean and rstd ([rows] fp32 each) for the backward.
With xhat = (x - mean) * rstd and g = dy * weight (fp32):
    dx = rstd * (g - xhat * mean(g * xhat) - mean(g)),
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
def _layer_norm_forward_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (centered * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_x, stride_dx,
                                n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr, ROWS: tl.constexpr):
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
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=tile_mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)
    tl.store(DB_PARTIAL + pid * n_cols + cols, db, mask=mask)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    @on_device
    def forward(ctx, x, weight, bias, eps):
        x2 = as_rows(x)
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, num_warps = row_config(n_cols)
        _layer_norm_forward_kernel[(n_rows,)](x2, weight, bias, y, mean, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                                              BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y.view(x.shape)

    @staticmethod
    @on_device
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = as_rows(dy)
        n_rows, n_cols = x2.shape
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        block, num_warps = row_config(n_cols)
        rows = backward_rows(block)
        programs, rows_per_program = partial_programs(n_rows, x2, rows)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
        db_partial = torch.empty_like(dw_partial)
        _layer_norm_backward_kernel[(programs,)](dy2, x2, weight, mean, rstd, dx, dw_partial, db_partial,
                                                 dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
                                                 rows_per_program, BLOCK=block, ROWS=rows, num_warps=num_warps)
        dweight = dw_partial.sum(0).to(weight.dtype)
        dbias = db_partial.sum(0).to(ctx.bias_dtype)
        return dx.view(dy.shape), dweight, dbias, None


def layer_norm(x, weight, bias, eps: float):
    if use_triton(x):
        return LayerNormFunction.apply(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)
