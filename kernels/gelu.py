"""GELU, tanh approximation, with BLOOM's constants:
gelu(x) = 0.5 * x * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x^2))).

x [...] (fp32 or bf16) -> like x. Triton path, in fp32, rounded once: with
u = 0.79788456 * (x + 0.044715 * x^3) and s = sigmoid(2u) (so tanh(u) = 2s - 1, the
interpreter has no tanh):
    y = x * s,  dx = dy * (s + 2 * x * s * (1 - s) * 0.79788456 * (1 + 3 * 0.044715 * x^2)).
Grid: (rows, column blocks of `kernels.launch.elementwise_config`), as swiglu.
"""
from __future__ import annotations

import torch

from kernels.dispatch import tl, triton, use_triton
from kernels.launch import as_rows, elementwise_config, elementwise_grid, on_device


def gelu_reference(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


@triton.jit
def _gelu_gate(x):
    """sigmoid(2u): 0.5 * (1 + tanh(u)) of BLOOM's GELU."""
    return tl.sigmoid(2.0 * 0.79788456 * x * (1.0 + 0.044715 * x * x))


@triton.jit
def _gelu_forward_kernel(X, Y, stride_x, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * _gelu_gate(x)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_backward_kernel(DY, X, DX, stride_dy, stride_x, stride_dx, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    s = _gelu_gate(x)
    du_dx = 0.79788456 * (1.0 + 3.0 * 0.044715 * x * x)
    tl.store(DX + row * stride_dx + cols, (dy * (s + 2.0 * x * s * (1.0 - s) * du_dx)).to(DX.dtype.element_ty),
             mask=mask)


class GELUFunction(torch.autograd.Function):
    @staticmethod
    @on_device
    def forward(ctx, x):
        x2 = as_rows(x)
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        block, num_warps = elementwise_config(x2.shape[1])
        _gelu_forward_kernel[elementwise_grid(*x2.shape)](x2, y, x2.stride(0), y.stride(0), x2.shape[1], BLOCK=block,
                                                    num_warps=num_warps)
        ctx.save_for_backward(x2)
        return y.view(x.shape)

    @staticmethod
    @on_device
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dy2 = as_rows(dy)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        block, num_warps = elementwise_config(x2.shape[1])
        _gelu_backward_kernel[elementwise_grid(*x2.shape)](dy2, x2, dx, dy2.stride(0), x2.stride(0), dx.stride(0),
                                                     x2.shape[1], BLOCK=block, num_warps=num_warps)
        return dx.view(dy.shape)


def gelu(x):
    if use_triton(x):
        return GELUFunction.apply(x)
    return gelu_reference(x)
