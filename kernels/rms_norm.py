"""RMSNorm (Qwen2): y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32.

x [..., H] (fp32 or bf16), weight [H] -> y like x. The normalized value is cast back to x's
dtype before the weight multiply, as transformers does. With `residual`, the sum
x + residual is normalized and returned too: (y, x + residual).
"""
from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def rms_norm_reference(x, weight, eps: float):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm(x, weight, eps: float, residual=None):
    if residual is not None:
        x = x + residual
        return rms_norm(x, weight, eps), x
    if use_triton(x):
        raise NotImplementedError("Triton rms_norm lands with the kernels issue")
    return rms_norm_reference(x, weight, eps)
