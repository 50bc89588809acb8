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
import re

import torch

BACKENDS = ("auto", "torch", "triton")
MIN_TORCH = (2, 8)   # torch.mm / torch.baddbmm with out_dtype= (the fused loss's fp32 logits from bf16)


def version_at_least(version: str, minimum: tuple[int, int]) -> bool:
    """Whether a version string ("2.8.0+cu128", "2.4.post1") is at least (major, minor)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and tuple(map(int, found.groups())) >= minimum


def check_torch(version: str) -> None:
    """Fails at import of kernels, with what to do, on a torch older than the ops call."""
    if not version_at_least(version, MIN_TORCH):
        need = ".".join(map(str, MIN_TORCH))
        raise RuntimeError(f"torch {version} is too old for this engine: it needs torch >= {need} "
                           f"(torch.mm(..., out_dtype=) in the fused loss): pip install 'torch>={need}'")


check_torch(torch.__version__)
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


class TritonUnavailable(RuntimeError):
    """The triton backend was forced on a tensor Triton cannot run on."""


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on `x` should run its Triton kernel. Forced to triton, a CPU tensor
    without the interpreter is an error, not a silent fall back to the torch reference (a test
    comparing the two would compare the reference with itself)."""
    if _backend == "torch" or not HAS_TRITON:
        return False
    if _backend == "triton":
        if not (x.is_cuda or INTERPRETING or x.is_meta):
            raise TritonUnavailable(f"kernel backend 'triton' forced on a {x.device.type} tensor: Triton kernels run "
                                    "on CUDA tensors, or anywhere under TRITON_INTERPRET=1")
        return x.is_cuda or INTERPRETING
    return x.is_cuda


if _backend not in BACKENDS:
    raise ValueError(f"ENGINE_KERNELS={_backend!r}: choose one of {', '.join(BACKENDS)}")
