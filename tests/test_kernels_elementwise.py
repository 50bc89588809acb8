"""Triton rope, swiglu and gelu (under the interpreter) against their torch references.

Same method as test_kernels_norms.py (whose helper and NaN-poisoning fixture are reused):
outputs and every input gradient vs the reference in float64 (fp32 for bf16 inputs).
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.gelu import gelu
from kernels.rope import rope, rope_qkv, rope_reference
from kernels.swiglu import swiglu
from tests.helpers import rel_err
from tests.test_kernels_norms import DTYPES, check_against_reference

pytestmark = pytest.mark.usefixtures("poisoned_empty")

THETA = 1e6
# Two packed sequences, positions restarting at 0; the second starts far out to exercise
# large angles.
POSITIONS = torch.cat([torch.arange(4), torch.arange(3) + 30000])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(14, 2, 64), (12, 2, 128), (16, 16, 64), (3, 1, 64)])
def test_rope(heads, kv_heads, head_dim, dtype):
    t = len(POSITIONS)
    q, k = torch.randn(t, heads, head_dim), torch.randn(t, kv_heads, head_dim)
    check_against_reference(lambda q, k: rope(q, k, POSITIONS, THETA), (q, k), dtype)


def test_rope_single_token():
    check_against_reference(lambda q, k: rope(q, k, torch.tensor([7]), THETA),
                            (torch.randn(1, 2, 128), torch.randn(1, 1, 128)), torch.float32)


def test_rope_strided_views_of_fused_qkv():
    """q and k sliced out of one [T, Hq + 2 Hkv, D] projection (row strides != heads * D)."""
    t = len(POSITIONS)

    def rope_of_slices(qkv):
        return rope(qkv[:, :4], qkv[:, 4:6], POSITIONS, THETA)

    check_against_reference(rope_of_slices, (torch.randn(t, 8, 64),), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rope_inplace_without_grad(backend):
    q, k = torch.randn(7, 4, 64), torch.randn(7, 2, 64)
    want_q, want_k = rope_reference(q, k, POSITIONS, THETA)
    with kernels.backend(backend), torch.no_grad():
        got_q, got_k = rope(q, k, POSITIONS, THETA, inplace=True)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert rel_err(q, want_q) < 1e-6 and rel_err(k, want_k) < 1e-6


def test_rope_inplace_ignored_under_autograd():
    """With gradients recorded, inplace=True leaves q and k untouched and the backward is right."""
    q, k = torch.randn(7, 4, 64), torch.randn(7, 2, 64)
    q_before = q.clone()
    check_against_reference(lambda q, k: rope(q, k, POSITIONS, THETA, inplace=True), (q, k), torch.float32)
    assert torch.equal(q, q_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(14, 2, 64), (12, 2, 128), (3, 1, 64)])
def test_rope_on_fused_qkv(heads, kv_heads, head_dim, dtype):
    """q and k rotated, v passed through, from one fused projection; one gradient for all three."""
    qkv = torch.randn(len(POSITIONS), (heads + 2 * kv_heads) * head_dim)
    check_against_reference(lambda qkv: rope_qkv(qkv, heads, kv_heads, POSITIONS, THETA), (qkv,), dtype)


# (rows, I): single element, odd width, widths that are not multiples of the 1024 column
# block, and real intermediate sizes with one or two rows.
ELEMENTWISE_SHAPES = [(1, 1), (3, 100), (2, 2816), (1, 4864), (1, 8960), (2, 3, 1100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_swiglu(shape, dtype):
    """gate_up [..., 2I]: gate (scaled by 3, into silu's curved range) then up."""
    check_against_reference(swiglu, (torch.cat((3 * torch.randn(shape), torch.randn(shape)), dim=-1),), dtype)


def test_swiglu_on_a_strided_row_view():
    """gate_up as a column slice of a wider tensor (row stride > 2I): the gradient still lands in place."""
    check_against_reference(lambda wide: swiglu(wide[:, 3:3 + 2 * 1100]), (torch.randn(3, 2 * 1100 + 5),),
                            torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid(-large) = 1/(1+inf) = 0
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES + [(2, 4096), (1, 6144)])
def test_gelu(shape, dtype):
    check_against_reference(gelu, (4 * torch.randn(shape),), dtype)
