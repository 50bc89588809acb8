"""The one rule that picks how an op is computed.

Every op in `kernels/` has a Triton path and a plain-torch reference path. `use_triton(x)`
decides between them: Triton for CUDA tensors, torch for CPU tensors, unless a switch forces
one side. The switch is the only global mutable state in the engine:

    set_backend("torch")          # force the reference everywhere (debugging, parity checks)
    with backend("triton"): ...   # force Triton (CPU tests under TRITON_INTERPRET=1)
    ENGINE_KERNELS=torch python cli.py ...   # the same from the environment
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import triton
    import triton.language as tl
else:
    class _Absent:
        """Stands in for triton so kernel files still import; use_triton() is then always False."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    triton = tl = _Absent()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

_backend = os.environ.get("ENGINE_KERNELS", "auto")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("kernel backend 'triton' asked for, but triton is not installed: pip install triton")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on `x` should run its Triton kernel."""
    if _backend == "torch" or not HAS_TRITON:
        return False
    if _backend == "triton":
        return x.is_cuda or INTERPRETING
    return x.is_cuda


if _backend not in BACKENDS:
    raise ValueError(f"ENGINE_KERNELS={_backend!r}: choose one of {', '.join(BACKENDS)}")
