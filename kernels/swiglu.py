"""SwiGLU gate (Qwen2 MLP) on a fused gate_up projection: gate_up [..., 2I] = (gate ++ up) -> silu(gate) * up [..., I].

Triton path: computed in fp32 and rounded once to the input dtype. With s = sigmoid(gate):
    y = gate * s * up,  dup = dy * gate * s,  dgate = dy * up * s * (1 + gate * (1 - s)).
The backward writes dgate and dup into one [..., 2I] gradient, the fused projection's own, so no
concatenation follows it. gate_up may be a strided row view with unit last stride. Grid: (rows,
column blocks of `kernels.launch.elementwise_config` over I).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import tl, triton, use_triton
from kernels.launch import as_rows, elementwise_config, elementwise_grid, on_device


def swiglu_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _swiglu_forward_kernel(GU, Y, stride_gu, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(DY, GU, DGU, stride_dy, stride_gu, stride_d, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    d_row = DGU + row * stride_d
    tl.store(d_row + cols, (dy * u * s * (1.0 + g * (1.0 - s))).to(DGU.dtype.element_ty), mask=mask)
    tl.store(d_row + n_cols + cols, (dy * g * s).to(DGU.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    @on_device
    def forward(ctx, gate_up):
        gu = as_rows(gate_up)
        rows, n = gu.shape[0], gu.shape[1] // 2
        y = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
        block, num_warps = elementwise_config(n)
        _swiglu_forward_kernel[elementwise_grid(rows, n)](gu, y, gu.stride(0), y.stride(0), n, BLOCK=block,
                                                          num_warps=num_warps)
        ctx.save_for_backward(gu)
        return y.view(*gate_up.shape[:-1], n)

    @staticmethod
    @on_device
    def backward(ctx, dy):
        (gu,) = ctx.saved_tensors
        dy2 = as_rows(dy)
        rows, n = dy2.shape
        dgu = torch.empty((rows, 2 * n), dtype=gu.dtype, device=gu.device)
        block, num_warps = elementwise_config(n)
        _swiglu_backward_kernel[elementwise_grid(rows, n)](dy2, gu, dgu, dy2.stride(0), gu.stride(0), dgu.stride(0), n,
                                                           BLOCK=block, num_warps=num_warps)
        return dgu.view(*dy.shape[:-1], 2 * n)


def swiglu(gate_up):
    if use_triton(gate_up):
        if gate_up.shape[-1] % 2:
            raise ValueError(f"swiglu: gate_up {tuple(gate_up.shape)} must hold gate and up, an even last dimension")
        return SwiGLUFunction.apply(gate_up)
    return swiglu_reference(gate_up)
