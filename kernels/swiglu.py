"""SwiGLU gate (Qwen2 MLP): silu(gate) * up, elementwise; gate, up [..., I] -> [..., I].

Triton path: computed in fp32 and rounded once to the input dtype. With s = sigmoid(gate):
    y = gate * s * up,  dup = dy * gate * s,  dgate = dy * up * s * (1 + gate * (1 - s)).
Gate and up may be strided row views (e.g. the halves of a fused gate_up projection) with
unit last stride. Grid: (rows, column blocks of `kernels.launch.elementwise_config`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import tl, triton, use_triton
from kernels.launch import as_rows, elementwise_config, elementwise_grid, on_device


def swiglu_reference(gate, up):
    return F.silu(gate) * up


@triton.jit
def _swiglu_forward_kernel(G, U, Y, stride_g, stride_u, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_d, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + row * stride_d + cols, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * stride_d + cols, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    @on_device
    def forward(ctx, gate, up):
        g2, u2 = as_rows(gate), as_rows(up)
        y = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        block, num_warps = elementwise_config(g2.shape[1])
        _swiglu_forward_kernel[elementwise_grid(*g2.shape)](g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), g2.shape[1],
                                                      BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(g2, u2)
        return y.view(gate.shape)

    @staticmethod
    @on_device
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dy2 = as_rows(dy)
        dgate, dup = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device), torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
        block, num_warps = elementwise_config(g2.shape[1])
        _swiglu_backward_kernel[elementwise_grid(*g2.shape)](dy2, g2, u2, dgate, dup, dy2.stride(0), g2.stride(0),
                                                       u2.stride(0), dgate.stride(0), g2.shape[1], BLOCK=block,
                                                       num_warps=num_warps)
        return dgate.view(dy.shape), dup.view(dy.shape)


def swiglu(gate, up):
    if use_triton(gate):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
