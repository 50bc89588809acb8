"""Fused linear cross-entropy (Triton, interpreted) against the float64 torch reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.linear_cross_entropy import (CHUNK_MULTIPLE, chunk_plan, linear_cross_entropy, padded_width,
                                         triton_ce_rows)
from tests.helpers import rel_err

# triton 3.6's interpreter warns on every `range` over a runtime bound
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_inputs(T, H, V, dtype):
    hidden = torch.randn(T, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) * H ** -0.5 * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,))
    return hidden, weight, labels


def reference(hidden, weight, labels, reduction):
    """Loss and gradients in float64 from the inputs' own (rounded) values."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def budget(chunk, V, dtype):
    """The logits budget that gives training chunks of `chunk` rows (logits in the inputs' dtype)."""
    return chunk * dtype.itemsize * V


def fused(hidden, weight, labels, reduction, chunk, backend="triton", grad_output=1.0):
    """The chunked op: Triton rows ("triton") or torch rows ("torch", fp32 only); gradients of grad_output * loss."""
    with kernels.backend(backend):
        loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction,
                                    budget_bytes=budget(chunk, weight.shape[0], hidden.dtype))
    (grad_output * loss).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_several_chunks_with_an_ignored_chunk(reduction, backend):
    T, H, V = 2 * CHUNK_MULTIPLE + 1, 32, 1003  # odd T and V: chunks of 128, 128, 1
    hidden, weight, labels = make_inputs(T, H, V, torch.float32)
    labels[CHUNK_MULTIPLE:2 * CHUNK_MULTIPLE] = -100  # the whole second chunk carries no loss
    labels[::7] = -100
    assert chunk_plan(T, H, V, torch.float32, CHUNK_MULTIPLE * 4 * V).chunk_tokens == CHUNK_MULTIPLE
    loss, grad_h, grad_w = fused(hidden, weight, labels, reduction, CHUNK_MULTIPLE, backend)
    ref_loss, ref_h, ref_w = reference(hidden, weight, labels, reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < TOL[torch.float32]
    assert rel_err(grad_h, ref_h) < TOL[torch.float32]
    assert rel_err(grad_w, ref_w) < TOL[torch.float32]
    assert grad_h[labels == -100].abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_losses_match_float64_reference(dtype, backend):
    """reduction "none" (scoring): each token's loss over several chunks, 0 where ignored, no backward."""
    if backend == "torch" and dtype == torch.bfloat16:
        backend = "auto"  # bf16 on the CPU takes the reference path
    T, H, V = CHUNK_MULTIPLE + 3, 32, 517
    hidden, weight, labels = make_inputs(T, H, V, dtype)
    labels[::5] = -100
    want = F.cross_entropy(hidden.detach().double() @ weight.detach().double().t(), labels, reduction="none")
    with pytest.raises(ValueError, match="no backward"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with torch.no_grad(), kernels.backend(backend):
        got = linear_cross_entropy(hidden, weight, labels, reduction="none", budget_bytes=CHUNK_MULTIPLE * 4 * V)
    assert got.shape == (T,) and got.dtype == torch.float32
    assert got[labels == -100].abs().max() == 0
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_matches_float64_reference(seed):
    torch.manual_seed(seed)
    T, H, V = 97, 64, 2053
    hidden, weight, labels = make_inputs(T, H, V, torch.bfloat16)
    labels[:5] = -100
    loss, grad_h, grad_w = fused(hidden, weight, labels, "mean", CHUNK_MULTIPLE)
    ref_loss, ref_h, ref_w = reference(hidden, weight, labels, "mean")
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # training: bf16 logits (each rounded by at most 2^-9), the loss summed in fp32
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-3
    assert rel_err(grad_h, ref_h) < TOL[torch.bfloat16]
    assert rel_err(grad_w, ref_w) < TOL[torch.bfloat16]
    with torch.no_grad(), kernels.backend("triton"):   # forward only: fp32 logits, the loss not bf16-rounded
        exact = linear_cross_entropy(hidden, weight, labels, budget_bytes=budget(CHUNK_MULTIPLE, V, torch.float32))
    assert abs(exact.item() - ref_loss.item()) / ref_loss.item() < 1e-5


def test_cpu_gemms_get_no_padded_rows(monkeypatch):
    """Every matrix the op hands a CPU GEMM is dense: a BLAS may read past a row's logical end (oneDNN
    on AMX-BF16 does), so padding between rows, e.g. a bf16 view of the fp32 logits, must never reach it."""
    seen = []

    def dense(t):
        return t.is_contiguous() or t.t().is_contiguous()

    def spy(gemm):
        def checked(*args, **kwargs):
            seen.extend(dense(a) for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
            return gemm(*args, **kwargs)
        return checked

    monkeypatch.setattr(torch, "mm", spy(torch.mm))
    monkeypatch.setattr(torch.Tensor, "addmm_", spy(torch.Tensor.addmm_))
    for dtype in (torch.bfloat16, torch.float32):
        hidden, weight, labels = make_inputs(CHUNK_MULTIPLE + 5, 32, 259, dtype)
        fused(hidden, weight, labels, "mean", CHUNK_MULTIPLE)
    assert len(seen) >= 12 and all(seen)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_is_nan_for_mean_zero_for_sum_with_zero_grads(backend):
    T, H, V = 9, 16, 259
    for reduction, expected in (("mean", math.nan), ("sum", 0.0)):
        hidden, weight, _ = make_inputs(T, H, V, torch.float32)
        labels = torch.full((T,), -100)
        loss, grad_h, grad_w = fused(hidden, weight, labels, reduction, CHUNK_MULTIPLE, backend)
        torch_loss = F.cross_entropy(hidden.detach() @ weight.detach().t(), labels, reduction=reduction)
        assert math.isnan(loss.item()) == math.isnan(torch_loss.item()) == math.isnan(expected)
        assert reduction == "mean" or loss.item() == 0.0
        assert grad_h.abs().max() == 0 and grad_w.abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tied_weight_grad_accumulates_with_embedding_and_previous_grad(backend):
    T, H, V = 33, 16, 301
    weight = (torch.randn(V, H) * 0.3).requires_grad_()
    ids, labels = torch.randint(0, V, (T,)), torch.randint(0, V, (T,))
    weight.grad = torch.randn(V, H)  # an earlier micro-batch's gradient
    previous = weight.grad.clone()
    with kernels.backend(backend):
        hidden = torch.tanh(F.embedding(ids, weight))
        (2.0 * linear_cross_entropy(hidden, weight, labels)).backward()
    w = weight.detach().double().requires_grad_()
    (2.0 * F.cross_entropy(torch.tanh(F.embedding(ids, w)) @ w.t(), labels)).backward()
    assert rel_err(weight.grad - previous, w.grad) < TOL[torch.float32]


def test_no_grad_loss_and_single_backward():
    T, H, V = 17, 16, 129
    hidden, weight, labels = make_inputs(T, H, V, torch.float32)
    ref_loss = reference(hidden, weight, labels, "sum")[0]
    with kernels.backend("triton"):
        with torch.no_grad():
            assert abs(linear_cross_entropy(hidden, weight, labels, reduction="sum").item() - ref_loss) < 1e-3
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()


def test_chunk_plan_at_qwen2_0_5b_shape_fits_1_2gb():
    """The bf16 logits chunk (512 MB: 5 chunks at 8K tokens) and the fp32 grad_W accumulator (545 MB)
    stay within ANCHORS' 1-2 GB at 32K tokens; forward only, fp32 logits in the same budget."""
    T, H, V = 32768, 896, 151936
    plan = chunk_plan(T, H, V, torch.bfloat16)
    assert plan.chunk_tokens % CHUNK_MULTIPLE == 0 and plan.chunk_tokens >= 1024
    assert plan.logits_dtype == torch.bfloat16 and -(-8192 // plan.chunk_tokens) == 5
    assert plan.peak_extra_bytes <= 1.2e9
    scoring = chunk_plan(T, H, V, torch.bfloat16, grads=False)
    assert scoring.logits_dtype == torch.float32 and scoring.chunk_tokens == 768   # 512 MB of fp32 rows
    logits_gb = 4 * T * V / 1e9  # what an unfused fp32 loss would hold, before its gradient
    assert logits_gb > 19
    assert chunk_plan(64, H, V, torch.bfloat16).chunk_tokens == 64  # never more rows than tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_chunks_and_one_chunk_match_float64_reference(dtype):
    """Chunks of 128 rows (6, the last one short): grad_W written by the first chunk and added by the
    next, scaled by grad_output and rounded in backward; with one chunk (bf16) grad_W written straight
    in bf16 and scaled in place."""
    T, H, V = 5 * CHUNK_MULTIPLE + 3, 32, 517
    for chunk in (CHUNK_MULTIPLE, 6 * CHUNK_MULTIPLE):
        hidden, weight, labels = make_inputs(T, H, V, dtype)
        labels[::9] = -100
        plan = chunk_plan(T, H, V, dtype, budget(chunk, V, dtype))
        assert plan.chunk_tokens == min(chunk, T) and plan.accumulates(T, dtype) == (chunk < T or dtype == torch.float32)
        loss, grad_h, grad_w = fused(hidden, weight, labels, "mean", chunk, grad_output=-2.5)
        ref_loss, ref_h, ref_w = reference(hidden, weight, labels, "mean")
        ref_h, ref_w = -2.5 * ref_h, -2.5 * ref_w
        assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < (1e-5 if dtype == torch.float32 else 1e-3)
        assert rel_err(grad_h, ref_h) < TOL[dtype] and rel_err(grad_w, ref_w) < TOL[dtype]
        assert grad_w.dtype == dtype


@pytest.mark.parametrize("V", [517, 151936])
def test_row_kernel_on_padded_rows_writes_only_the_logical_row(V):
    """The row kernel over a logits buffer whose rows are padded to 16 bytes (as on a GPU; odd and
    Qwen2's vocabulary): loss and dz in place match float64, the padding columns are never written."""
    assert padded_width(517, torch.bfloat16, torch.device("cuda")) == 520
    assert padded_width(517, torch.float32, torch.device("cuda")) == 520
    assert padded_width(517, torch.bfloat16, torch.device("cpu")) == 517
    assert padded_width(V, torch.bfloat16, torch.device("cuda")) == -(-V // 8) * 8
    rows, width = 3, V + 11
    buf = torch.full((rows, width), 7.0).to(torch.bfloat16)
    z = buf[:, :V]
    z.copy_(torch.randn(rows, V) * 4)
    labels = torch.tensor([0, -100, V - 1])
    zd = z.double()
    want_loss = torch.logsumexp(zd, 1) - zd[[0, 0, 2], [0, 0, V - 1]]
    want_dz = (torch.softmax(zd, 1) - F.one_hot(labels.clamp(min=0), V)) * 0.5
    want_dz[1] = 0
    loss = torch.full((rows,), float("nan"))
    with kernels.backend("triton"):
        triton_ce_rows(z, labels, loss, torch.tensor([0.5]), -100, True)
    assert (loss[[0, 2]].double() - want_loss[[0, 2]]).abs().max() < 1e-5 * want_loss.abs().max()
    assert loss[1] == 0
    assert rel_err(z, want_dz) < TOL[torch.bfloat16]
    assert (buf[:, V:] == 7.0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_gradients_computed_under_no_grad(reduction, monkeypatch):
    """Under torch.no_grad the loss is computed without the gradient GEMMs (only the logits GEMM runs)."""
    hidden, weight, labels = make_inputs(CHUNK_MULTIPLE + 5, 32, 259, torch.float32)
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(a[0].shape) or mm(*a, **k))
    with torch.no_grad(), kernels.backend("triton"):
        loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, budget_bytes=budget(CHUNK_MULTIPLE, 259, torch.float32))
    assert len(calls) == 2          # two chunks' logits, no grad_hidden / grad_W products
    assert abs(loss.item() - reference(hidden, weight, labels, reduction)[0].item()) < 1e-4 * abs(loss.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="padded logits rows exist on a GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_vocabulary_on_a_gpu_pads_the_logits_rows(dtype):
    """V = 1003: the cuBLAS GEMMs write and read logits rows padded to 16 bytes (a strided out= view)."""
    T, H, V = 2 * CHUNK_MULTIPLE + 7, 64, 1003
    assert padded_width(V, dtype, torch.device("cuda")) > V
    hidden, weight, labels = (t.cuda() for t in make_inputs(T, H, V, dtype))
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss, grad_h, grad_w = fused(hidden, weight, labels, "mean", CHUNK_MULTIPLE)
    ref_loss, ref_h, ref_w = reference(hidden.cpu(), weight.cpu(), labels.cpu(), "mean")
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < (1e-5 if dtype == torch.float32 else 1e-3)
    assert rel_err(grad_h.cpu(), ref_h) < TOL[dtype] and rel_err(grad_w.cpu(), ref_w) < TOL[dtype]
