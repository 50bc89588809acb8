"""What every op's host code shares around a Triton launch.

    @on_device                      # the launch runs on its inputs' GPU, not the current one
    def triton_op(x, ...): ...
    hw = hardware_for(x)            # the limits a launch configuration must fit
    with target(TARGETS[89]): ...   # choose configurations for another GPU (compile checks, tests)

Triton launches on torch.cuda.current_device(), whatever device its tensors live on: with the
model on cuda:1, every kernel would run on GPU 0's stream against GPU 1's memory. `on_device`
makes the first tensor argument's device current for the call (a no-op for CPU and meta
tensors); every host function that launches a kernel, and every autograd Function's forward
and backward, is wrapped by it.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from kernels.hardware import TARGETS, Hardware, hardware_of

_target: Hardware | None = None     # set by `target`: configurations for this GPU, whatever runs


def device_of(x: torch.Tensor):
    """A context in which x's CUDA device is the current one (nothing to do off CUDA)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _first_tensor(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


def on_device(fn):
    """Runs fn with its first tensor argument's (or first tensor list's) device current."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = _first_tensor((*args, *kwargs.values()))
        if x is None:
            return fn(*args, **kwargs)
        with device_of(x):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def target(hw: Hardware):
    """Choose launch configurations for `hw` inside the block, whatever device the tensors are on."""
    global _target
    previous, _target = _target, hw
    try:
        yield hw
    finally:
        _target = previous


def hardware_for(x: torch.Tensor) -> Hardware:
    """The GPU whose limits x's launch configurations must fit: the `target` override, else x's
    own CUDA device, else the sm_90 target (interpreter and meta tensors)."""
    if _target is not None:
        return _target
    if x.device.type == "cuda":
        return hardware_of(x.device)
    return TARGETS[90]
