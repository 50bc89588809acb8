"""Triton rms_norm and layer_norm (under the interpreter) against their torch references.

Every output and every input gradient is compared with the reference run in float64 (fp32 for
bf16 inputs) on the same values, by relative norm error. torch.empty is poisoned with NaN so
an element a kernel forgets to write fails the comparison. `check_against_reference` is shared
with test_kernels_elementwise.py; `poisoned_empty` is in conftest.py.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.layer_norm import layer_norm
from kernels.rms_norm import rms_norm
from tests.helpers import rel_err

DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
REAL_HIDDEN = (896, 1024, 1536, 2048)
# triton 3.6's interpreter turns a range() bound built from a program id into an int this way
pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.usefixtures("poisoned_empty")]


def _run(op, inputs, backend, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    with kernels.backend(backend):
        outs = op(*leaves)
    return leaves, outs if isinstance(outs, tuple) else (outs,)


def check_against_reference(op, inputs, dtype, grad_outputs=None):
    """op(*inputs) on the Triton path in `dtype` vs the reference in float64 (fp32 for bf16):
    outputs, dtypes and the gradients of every input. grad_outputs: which outputs get a
    random gradient (default: all)."""
    inputs = [t.to(dtype) for t in inputs]  # both paths see the same values
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    leaves, outs = _run(op, inputs, "triton", dtype)
    ref_leaves, ref_outs = _run(op, inputs, "torch", ref_dtype)
    used = grad_outputs or range(len(outs))
    grads = [torch.randn_like(outs[i]) for i in used]
    torch.autograd.backward([outs[i] for i in used], grads)
    torch.autograd.backward([ref_outs[i] for i in used], [g.to(ref_dtype) for g in grads])
    tol = TOLERANCE[dtype]
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert out.dtype == dtype and out.shape == ref.shape, f"output {i}: {out.dtype} {tuple(out.shape)}"
        assert rel_err(out, ref) < tol, f"output {i}: relative error {rel_err(out, ref):.2e}"
    for i, (leaf, ref) in enumerate(zip(leaves, ref_leaves)):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, f"input {i} gradient missing or wrong dtype"
        error = rel_err(leaf.grad, ref.grad)
        assert error < tol, f"input {i} gradient: relative error {error:.2e}"


# (rows, H): a single row, odd H, more rows than the backward's 8 programs (uneven chunks,
# one program with no rows), a 3-D input, and the real hidden sizes with tiny row counts.
NORM_SHAPES = [(1, 896), (3, 100), (19, 100), (2, 3, 64)] + [(2, h) for h in REAL_HIDDEN]


def _norm_inputs(shape):
    x = 2 * torch.randn(shape) + 0.5
    return x, 1 + 0.1 * torch.randn(shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm(shape, dtype):
    check_against_reference(lambda x, w: rms_norm(x, w, 1e-6), _norm_inputs(shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (19, 100), (2, 1536)])
def test_rms_norm_fused_residual(shape, dtype):
    x, w = _norm_inputs(shape)
    check_against_reference(lambda x, w, r: rms_norm(x, w, 1e-6, residual=r), (x, w, torch.randn(shape)), dtype)


def test_rms_norm_fused_residual_sum_unused():
    """Only y carries a gradient: the backward runs without a gradient for the returned sum."""
    x, w = _norm_inputs((5, 100))
    check_against_reference(lambda x, w, r: rms_norm(x, w, 1e-6, residual=r), (x, w, torch.randn(5, 100)),
                            torch.float32, grad_outputs=[0])


def test_rms_norm_strided_rows():
    """x as the column slice of a wider tensor (row stride != H) reads the right elements."""
    x, w = _norm_inputs((6, 100))
    wide = torch.randn(6, 160)
    check_against_reference(lambda wide, w: rms_norm(wide[:, 30:130], w, 1e-6), (wide, w), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_layer_norm(shape, dtype):
    x, w = _norm_inputs(shape)
    check_against_reference(lambda x, w, b: layer_norm(x, w, b, 1e-5), (x, w, 0.1 * torch.randn(shape[-1])), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES + [(2, 2048)])
def test_layer_norm_with_fused_residual_add(shape, dtype):
    """(y, x + residual): both outputs get a gradient, as BLOOM's stream does (the sum feeds the next add)."""
    x, w = _norm_inputs(shape)
    check_against_reference(lambda x, w, b, r: layer_norm(x, w, b, 1e-5, residual=r),
                            (x, w, 0.1 * torch.randn(shape[-1]), torch.randn(shape)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(77, 100), (37, 896), (13, 1536)])
def test_norm_backward_row_tiles(shape, dtype):
    """Backward programs take several rows per iteration (kernels.launch.backward_rows): row counts that
    leave programs with partial tiles and more tiles than programs, at odd and real widths."""
    from kernels.launch import backward_rows, partial_programs, row_config
    rows = backward_rows(row_config(shape[1])[0])
    programs, per_program = partial_programs(shape[0], torch.empty(0), rows)
    assert rows > 1 and per_program % rows == 0 and (programs - 1) * per_program < shape[0] <= programs * per_program
    check_against_reference(lambda x, w: rms_norm(x, w, 1e-6), _norm_inputs(shape), dtype)
    x, w = _norm_inputs(shape)
    check_against_reference(lambda x, w, r: rms_norm(x, w, 1e-6, residual=r), (x, w, torch.randn(shape)), dtype)
    check_against_reference(lambda x, w, b: layer_norm(x, w, b, 1e-5), (*_norm_inputs(shape), torch.randn(shape[1])),
                            dtype)
    check_against_reference(lambda x, w, b, r: layer_norm(x, w, b, 1e-5, residual=r),
                            (*_norm_inputs(shape), torch.randn(shape[1]), torch.randn(shape)), dtype)
