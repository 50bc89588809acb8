"""SwiGLU gate (Qwen2 MLP): silu(gate) * up, elementwise; gate, up [..., I] -> [..., I]."""
from __future__ import annotations

import torch.nn.functional as F

from kernels.dispatch import use_triton


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def swiglu(gate, up):
    if use_triton(gate):
        raise NotImplementedError("Triton swiglu lands with the kernels issue")
    return swiglu_reference(gate, up)
