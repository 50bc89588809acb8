"""Fused ops, one file each: Triton kernel(s), autograd wrapper and torch reference.

Models and the engine call ops by these names only; `kernels.dispatch` picks the path.
"""
from kernels.adamw import adamw_step
from kernels.attention import attention
from kernels.decode_attention import decode_attention
from kernels.dispatch import backend, get_backend, set_backend, use_triton
from kernels.gelu import gelu
from kernels.layer_norm import layer_norm
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.rms_norm import rms_norm
from kernels.rope import rope
from kernels.swiglu import swiglu

__all__ = ["adamw_step", "attention", "backend", "decode_attention", "gelu", "get_backend", "layer_norm",
           "linear_cross_entropy", "rms_norm", "rope", "set_backend", "swiglu", "use_triton"]
