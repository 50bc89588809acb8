"""Fused ops, one file each: Triton kernel(s), autograd wrapper and torch reference.

Callers import an op from its module (`from kernels.rms_norm import rms_norm`); this package
holds only the dispatch switch that picks each op's path (`kernels.dispatch`).
"""
from kernels.dispatch import backend, get_backend, set_backend, use_triton

__all__ = ["backend", "get_backend", "set_backend", "use_triton"]
