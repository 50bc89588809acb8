import os

import torch


def should_interpret(environ, cuda_available: bool) -> bool:
    """Whether the suite runs Triton kernels in the interpreter: as TRITON_INTERPRET says where
    the user set it, else exactly when no CUDA device is present (a GPU box runs the compiled
    kernels, which bench/gpu.sh and a plain `pytest tests` there must test)."""
    if "TRITON_INTERPRET" in environ:
        return environ["TRITON_INTERPRET"] == "1"
    return not cuda_available


# Chosen before any @triton.jit decorator runs (they pick interpreted or compiled when defined),
# so before anything imports kernels.
os.environ["TRITON_INTERPRET"] = "1" if should_interpret(os.environ, torch.cuda.is_available()) else "0"

import pytest  # noqa: E402

from tests.helpers import single_thread  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Off the interpreter (a GPU box), a test that forces the triton backend on CPU tensors cannot
    test a kernel: it is skipped, saying so (tests/test_gpu.py runs the kernels on CUDA there)."""
    from kernels.dispatch import TritonUnavailable
    try:
        return (yield)
    except TritonUnavailable as e:
        pytest.skip(f"{e}: an interpreter test, skipped with the interpreter off")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


one_thread = pytest.fixture(single_thread)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled floating tensors, so an element a kernel
    forgets to write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
