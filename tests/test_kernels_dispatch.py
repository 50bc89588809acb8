"""Where and how the kernels run: interpreter or compiled, the torch floor, and every launch on
its inputs' device (kernels.launch.on_device)."""
import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kernels
from kernels import launch
from kernels.attention import cu_seqlens
from kernels.dispatch import check_torch, version_at_least
from tests.conftest import should_interpret

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # interpreter


# ---------------------------------------------------------------------------------------------
# Interpreter or compiled kernels
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("environ, cuda, expected", [
    ({}, False, True),                              # CPU box: the interpreter
    ({}, True, False),                              # GPU box: compiled kernels
    ({"TRITON_INTERPRET": "1"}, True, True),        # asked for on a GPU box
    ({"TRITON_INTERPRET": "0"}, False, False),      # asked against on a CPU box
])
def test_should_interpret(environ, cuda, expected):
    assert should_interpret(environ, cuda) is expected


def test_a_cuda_machine_runs_compiled_kernels():
    """The suite's conftest on a machine with a CUDA device and TRITON_INTERPRET unset: the kernels
    are compiled (JITFunction), not interpreted."""
    code = "\n".join([
        "import os, torch",
        "torch.cuda.is_available = lambda: True",
        "import tests.conftest",
        "from kernels import dispatch, rms_norm",
        "from triton.runtime.interpreter import InterpretedFunction",
        "assert os.environ['TRITON_INTERPRET'] == '0', os.environ['TRITON_INTERPRET']",
        "assert not dispatch.INTERPRETING",
        "assert not isinstance(rms_norm._rms_norm_forward_kernel, InterpretedFunction)",
    ])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version, minimum, expected", [
    ("2.8.0", (2, 8), True), ("2.13.0+cpu", (2, 8), True), ("2.11.0+cu130", (2, 8), True),
    ("2.7.1+cu126", (2, 8), False), ("2.5.0", (2, 8), False), ("3.0.0a0", (2, 8), True),
    ("2.4.post1", (2, 4), True), ("2.3.6", (2, 4), False), ("garbage", (2, 4), False),
])
def test_version_at_least(version, minimum, expected):
    assert version_at_least(version, minimum) is expected


def test_old_torch_fails_at_import_with_what_to_do():
    with pytest.raises(RuntimeError, match=r"torch 2\.5\.1 is too old .* pip install 'torch>=2\.8'"):
        check_torch("2.5.1")
    check_torch("2.8.0")
    check_torch(torch.__version__)


# ---------------------------------------------------------------------------------------------
# The torch reference on CPU tensors, the Triton path only where forced
# ---------------------------------------------------------------------------------------------

class TritonPathCalled(Exception):
    pass


def _forbidden(*args, **kwargs):
    raise TritonPathCalled


@pytest.mark.parametrize("module, triton_path, shape, call", [
    ("rms_norm", "RMSNormFunction.apply", (2, 8), lambda m, x: m.rms_norm(x, torch.ones(8), 1e-6, residual=x)),
    ("layer_norm", "LayerNormFunction.apply", (2, 8),
     lambda m, x: m.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)),
    ("rope", "RopeFunction.apply", (2, 8), lambda m, x: m.rope(x.view(2, 1, 8), x.view(2, 1, 8), torch.arange(2), 1e4)),
    ("swiglu", "SwiGLUFunction.apply", (2, 8), lambda m, x: m.swiglu(x)),
    ("gelu", "GELUFunction.apply", (2, 8), lambda m, x: m.gelu(x)),
    ("attention", "flash_attention_forward", (5, 2, 64), lambda m, q: m.attention(q, q, q, cu_seqlens([5]), 5)),
    ("decode_attention", "triton_decode_attention", (2, 4, 64),
     lambda m, q: m.decode_attention(q, torch.randn(2, 2, 8, 64), torch.randn(2, 2, 8, 64),
                                     torch.tensor([1, 8], dtype=torch.int32), torch.tensor([1, 0]))),
])
def test_cpu_tensors_take_the_reference_unless_triton_is_forced(monkeypatch, module, triton_path, shape, call):
    m = importlib.import_module(f"kernels.{module}")
    owner, _, name = triton_path.rpartition(".")
    monkeypatch.setattr(getattr(m, owner) if owner else m, name, _forbidden)
    x = torch.randn(shape, requires_grad=True)
    for reference in ("auto", "torch"):
        with kernels.backend(reference):
            call(m, x)
    with kernels.backend("triton"), pytest.raises(TritonPathCalled):
        call(m, x)


# ---------------------------------------------------------------------------------------------
# Every launch on its inputs' device
# ---------------------------------------------------------------------------------------------

def recorder(log: list):
    """A context manager factory that only records what it was entered with."""
    @contextlib.contextmanager
    def enter(x):
        log.append(x)
        yield
    return enter


def test_device_of_makes_the_tensor_s_cuda_device_current(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", recorder(entered))
    with launch.device_of(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch.device_of(torch.empty(1)), launch.device_of(torch.empty(1, device="meta")):
        pass
    assert entered == [torch.device("cuda", 1)]          # CPU and meta tensors: nothing to switch


def test_on_device_enters_the_first_tensor_argument(monkeypatch):
    seen = []
    monkeypatch.setattr(launch, "device_of", recorder(seen))
    a, b = torch.empty(1), torch.empty(2)
    wrapped = launch.on_device(lambda *args, **kwargs: "ran")
    assert wrapped(None, 3, a, b) == "ran" and seen[-1] is a
    assert wrapped([b, a], scale=1.0) == "ran" and seen[-1] is b       # a list of tensors (adamw)
    assert wrapped(x=a) == "ran" and seen[-1] is a
    assert wrapped(1, 2) == "ran" and len(seen) == 3                    # no tensor: nothing entered


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch with the devices of the `device_of` contexts active at that moment."""
    from triton.runtime.interpreter import InterpretedFunction
    active, seen = [], []
    real_device_of, real_run = launch.device_of, InterpretedFunction.run

    @contextlib.contextmanager
    def spy(x):
        active.append(x.device)
        with real_device_of(x):
            yield
        active.pop()

    def run(self, *args, **kwargs):
        seen.append((self.__name__, list(active)))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(launch, "device_of", spy)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _grad_inputs(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def _op_calls():
    """(name, forward() -> output to differentiate or None) for every op's public entry point."""
    from kernels.adamw import adamw_step
    from kernels.attention import attention
    from kernels.decode_attention import decode_attention
    from kernels.gelu import gelu
    from kernels.layer_norm import layer_norm
    from kernels.linear_cross_entropy import linear_cross_entropy
    from kernels.rms_norm import rms_norm
    from kernels.rope import rope
    from kernels.swiglu import swiglu

    def adamw():
        n = 37
        adamw_step([torch.randn(n)], [torch.randn(n)], [torch.zeros(n)], [torch.zeros(n)], step=1, lr=1e-3,
                   beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)

    x, w, b, r = _grad_inputs((3, 16), (16,), (16,), (3, 16))
    q, k, v = _grad_inputs((9, 4, 16), (9, 2, 16), (9, 2, 16))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    return {
        "rms_norm": lambda: rms_norm(x, w, 1e-6),
        "rms_norm+residual": lambda: sum(rms_norm(x, w, 1e-6, residual=r)),
        "layer_norm": lambda: layer_norm(x, w, b, 1e-5),
        "rope": lambda: sum(t.sum() for t in rope(q, k, torch.arange(9), 1e4)),
        "swiglu": lambda: swiglu(torch.cat((x, r), dim=-1)),
        "gelu": lambda: gelu(x),
        "attention": lambda: attention(q, k, v, cu, 5),
        "linear_cross_entropy": lambda: linear_cross_entropy(x, torch.randn(11, 16, requires_grad=True),
                                                             torch.randint(0, 11, (3,))),
        "decode_attention": lambda: decode_attention(torch.randn(2, 4, 16), torch.randn(2, 2, 8, 16),
                                                     torch.randn(2, 2, 8, 16), torch.tensor([3, 8], dtype=torch.int32)),
        "adamw_step": adamw,
    }


@pytest.mark.parametrize("name", list(_op_calls()))
def test_every_launch_runs_on_its_inputs_device(name, launches):
    """Forward and backward of each op's public entry point: every kernel launch happens inside
    kernels.launch.device_of of an input's device (a CUDA device would be made current)."""
    with kernels.backend("triton"):
        out = _op_calls()[name]()
        forward = len(launches)
        if out is not None and out.requires_grad:
            out.sum().backward()
    assert forward > 0, "no Triton launch: the op did not take its Triton path"
    assert all(devices and devices[-1] == torch.device("cpu") for _, devices in launches), launches
    if name not in ("linear_cross_entropy", "decode_attention", "adamw_step"):   # those launch nothing backward
        assert len(launches) > forward, "the backward launched no kernel"
