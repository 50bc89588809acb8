"""Output layer fused with cross-entropy: the logits are never materialized whole.

hidden [T, H], weight [V, H] (the output matrix, tied or not), labels [T] int64 with
ignore_index (-100) on tokens that carry no loss. loss_t = logsumexp(hidden_t . W^T) -
hidden_t . W[labels_t], computed in fp32. reduction "mean": sum over valid tokens / their
count; "sum": the sum (the training loop divides by a global token count); "none": the fp32
per-token losses [T], 0 on ignored tokens, forward only (scoring: engine/scoring.py). With every
label ignored, "mean" is 0/0 = NaN as in torch (gradients are then zero); "sum" is 0.

Chunked path (Triton: fp32 or bf16 hidden/weight of one dtype; torch: fp32, the CPU default,
with the row step in torch ops instead of the Triton kernel). Tokens are processed in chunks of C
rows, C chosen by `chunk_plan` from a memory budget for the logits chunk [C, V] (not from V/H, so
the GEMMs stay large), with no host synchronization anywhere. Per chunk:
    z = h_c @ W^T                       cuBLAS, fp32 accumulation, stored [C, V] in the logits dtype
    one program per row: lse = logsumexp(z) (online, fp32), loss_t = lse - z[label], then, training,
    dz = (softmax(z) - onehot(label)) * scale (scale = 1 / n_valid for "mean", a device tensor; 0 on
    ignored rows) computed in fp32 and written over z in place
    grad_h[c] = dz @ W                  [C, H], hidden's dtype
    grad_W  (+)= dz^T @ h_c             [V, H]: the first chunk writes the fp32 accumulator (no
                                        zeroing pass), later ones add; with a single chunk and
                                        bf16 inputs, written straight in bf16 (no accumulator)
The gradients are computed in the forward pass and kept; backward scales them by the scalar
grad_output (in place, or for the fp32 accumulator in the pass that rounds it to the weight's
dtype: backward may run once per forward). `traffic` counts the bytes.

The logits dtype: training, the inputs' own (bf16 for a bf16 model, as transformers computes
them before upcasting for its loss); forward only (evaluation, scoring), fp32. bf16 logits carry
a relative rounding of at most 2^-9 (0.06 at a logit of 30: a memorized token's loss of 1e-3 is
then known to about 6%, as in transformers), and cost half the bytes: z is written once in bf16,
read twice by the row kernel and overwritten by dz, which the gradient GEMMs read in bf16 anyway.
Scoring (bits memorized) keeps fp32 logits: there every token's loss is the result. On a GPU the
rows of the logits buffer are padded to 16 bytes (odd vocabularies: aligned vector loads and
cuBLAS kernels); on the CPU they are dense (a BLAS may read past a row's logical end).
grad_W is accumulated in fp32 over the chunks and rounded to the weight's dtype once, in backward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.dispatch import tl, triton, use_triton
from kernels.launch import on_device

LOGITS_BUDGET_BYTES = 512 << 20  # logits chunk: 1,664 bf16 rows (training) or 768 fp32 rows at V=151,936
CHUNK_MULTIPLE = 128  # chunk rows in whole GEMM tiles
ROW_ALIGN_BYTES = 16  # logits rows padded to this on a GPU


class ChunkPlan(NamedTuple):
    chunk_tokens: int  # rows of hidden per chunk
    peak_extra_bytes: int  # most memory the op holds at once beyond its inputs
    logits_dtype: torch.dtype = torch.float32

    def accumulates(self, T: int, dtype: torch.dtype) -> bool:
        """Whether grad_W goes through the fp32 accumulator (several chunks, or fp32 anyway)."""
        return dtype == torch.float32 or self.chunk_tokens < T


def logits_dtype(dtype: torch.dtype, grads: bool) -> torch.dtype:
    """Training keeps the inputs' dtype (dz overwrites z); forward only computes fp32 logits."""
    return dtype if grads else torch.float32


def padded_width(V: int, dtype: torch.dtype, device: torch.device) -> int:
    """Row stride of the logits buffer: V rounded up to ROW_ALIGN_BYTES on a GPU, V on the CPU."""
    if device.type == "cpu":
        return V
    per = ROW_ALIGN_BYTES // dtype.itemsize
    return -(-V // per) * per


def chunk_plan(T: int, H: int, V: int, dtype: torch.dtype, budget_bytes: int = LOGITS_BUDGET_BYTES,
               grads: bool = True) -> ChunkPlan:
    """Chunk size for T tokens and the peak memory, everything the op allocates counted.

    Rows per chunk: the largest multiple of CHUNK_MULTIPLE whose logits [C, V] in the logits dtype fit
    in budget_bytes (at least CHUNK_MULTIPLE, at most T). The peak, with grads: during the loop logits
    + fp32 grad_W accumulator (if used) + grad_hidden + per-token losses; at the end accumulator +
    grad_W in `dtype` + grad_hidden + losses.
    """
    z_dtype = logits_dtype(dtype, grads)
    rows = max(CHUNK_MULTIPLE, budget_bytes // (z_dtype.itemsize * V) // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
    chunk = min(rows, T)
    logits = z_dtype.itemsize * chunk * V
    per_token = 4 * T
    if not grads:
        return ChunkPlan(chunk, logits + per_token, z_dtype)
    plan = ChunkPlan(chunk, 0, z_dtype)
    grad_hidden = dtype.itemsize * T * H
    accumulator = 4 * V * H if plan.accumulates(T, dtype) else 0
    rounded = dtype.itemsize * V * H if accumulator and dtype != torch.float32 else 0
    peak = max(logits, rounded) + accumulator + grad_hidden + per_token
    return plan._replace(peak_extra_bytes=peak)


def traffic(T: int, H: int, V: int, dtype: torch.dtype, budget_bytes: int = LOGITS_BUDGET_BYTES) -> dict[str, int]:
    """Bytes each part of a training call (gradients of hidden and weight) moves, from chunk_plan's
    chunks, as _fused_forward and backward run them: per chunk of n rows the logits GEMM (W and h
    read, z written), the row kernel (z read twice, dz written over it), the grad_hidden GEMM (dz and
    W read, grad_h written) and the grad_W GEMM (dz and h read, the fp32 accumulator written by the
    first chunk, read and written by the others); in backward, grad_hidden scaled in place and grad_W
    scaled (the fp32 accumulator: scaled and rounded to the weight's dtype in the same pass)."""
    e = dtype.itemsize
    plan = chunk_plan(T, H, V, dtype, budget_bytes)
    z = plan.logits_dtype.itemsize
    accumulates = plan.accumulates(T, dtype)
    parts = dict.fromkeys(("logits GEMM", "row kernel (lse, dz)", "grad_hidden GEMM", "grad_W GEMM",
                           "grad_W round, scale"), 0)
    for start in range(0, T, plan.chunk_tokens):
        n = min(plan.chunk_tokens, T - start)
        parts["logits GEMM"] += e * V * H + e * n * H + z * n * V
        parts["row kernel (lse, dz)"] += 3 * z * n * V + 12 * n
        parts["grad_hidden GEMM"] += z * n * V + e * V * H + e * n * H
        parts["grad_W GEMM"] += z * n * V + e * n * H + (4 if accumulates else e) * V * H * (1 if start == 0 else 2)
    # backward: the fp32 accumulator scaled and rounded to the weight's dtype in one pass, else grad_W scaled in place
    scale_w = (4 + e) * V * H if accumulates and dtype != torch.float32 else 2 * e * V * H
    parts["grad_W round, scale"] = scale_w + 2 * e * T * H
    return parts


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean"):
    logits = hidden.float() @ weight.float().t()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def ce_rows_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for _ce_rows_kernel: a row streams through blocks of BLOCK_V."""
    block = min(triton.next_power_of_2(V), 4096)
    return block, 8 if block >= 4096 else 4


@triton.jit
def _ce_rows_kernel(Z, LABELS, LOSS, SCALE, V, stride_z, ignore_index,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    z_row = Z + row * stride_z
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    # per-lane running max and sum of exp, merged once at the end
    m = tl.full([BLOCK_V], -3.0e38, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    in_range = valid & (label >= 0) & (label < V)
    z_label = tl.load(z_row + label, mask=in_range, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - z_label, 0.0))
    if WRITE_GRAD:
        coef = tl.where(valid, tl.load(SCALE), 0.0)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(z_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(start + cols == label, 1.0, 0.0)) * coef
            # dz overwrites z in place: every warp finishes its loads before any store lands
            tl.debug_barrier()
            tl.store(z_row + start + cols, g.to(Z.dtype.element_ty), mask=mask)


def _ce_rows_torch(z, labels, row_loss, scale, ignore_index, write_grad):
    """`triton_ce_rows` in torch ops for fp32 on the CPU."""
    valid = labels != ignore_index
    lse = torch.logsumexp(z, dim=1)
    picked = z.gather(1, labels.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    row_loss.copy_(torch.where(valid, lse - picked, 0.0))
    if write_grad:
        rows = valid.nonzero()[:, 0]
        z.sub_(lse[:, None]).exp_()
        z[rows, labels[rows]] -= 1.0
        z.mul_(torch.where(valid, scale, 0.0)[:, None])


@on_device
def triton_ce_rows(z, labels, row_loss, scale, ignore_index, write_grad):
    """Per-row loss into row_loss; with write_grad, the scaled softmax gradient written over z."""
    n, V = z.shape
    block, num_warps = ce_rows_config(V)
    _ce_rows_kernel[(n,)](z, labels, row_loss, scale, V, z.stride(0), ignore_index,
                          WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=num_warps)


def mm_fp32(a, b, out=None) -> torch.Tensor:
    """a @ b with fp32 output (into `out` if given): cuBLAS writes fp32 from half inputs on a GPU
    (torch >= 2.8); elsewhere the inputs are upcast (CPU BLAS has no mixed-dtype GEMM)."""
    if a.dtype == b.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _mm_into(a, b, out):
    """a @ b into out, in out's dtype (fp32 out from half inputs: mm_fp32), accumulated in fp32."""
    if out.dtype == torch.float32:
        return mm_fp32(a, b, out)
    return torch.mm(a, b, out=out)


def _addmm_fp32_(acc, a, b):
    """acc (fp32) += a @ b without rounding acc to a's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:  # addmm's out_dtype wants self in the input dtype; baddbmm's does not
        torch.baddbmm(acc[None], a[None], b[None], out_dtype=torch.float32, out=acc[None])
    else:
        acc.addmm_(a.float(), b.float())


def _loss_scale(labels, ignore_index, reduction):
    """(n_valid, scale) as device tensors: scale multiplies each row's gradient."""
    n_valid = (labels != ignore_index).sum()
    if reduction == "mean":
        return n_valid, (1.0 / n_valid.clamp(min=1).float()).reshape(1)
    return n_valid, torch.ones(1, dtype=torch.float32, device=labels.device)


def _fused_forward(hidden, weight, labels, ignore_index, reduction, budget_bytes, need_gh, need_gw, ce_rows):
    """(loss, grad_hidden or None, grad_weight or None), gradients for grad_output = 1; grad_weight is the
    fp32 accumulator when chunk_plan uses one (backward rounds it)."""
    T, H = hidden.shape
    V = weight.shape[0]
    grads = need_gh or need_gw
    plan = chunk_plan(T, H, V, hidden.dtype, budget_bytes, grads)
    chunk = plan.chunk_tokens
    width = padded_width(V, plan.logits_dtype, hidden.device)
    logits = torch.empty((chunk, width), dtype=plan.logits_dtype, device=hidden.device)[:, :V]
    row_loss = torch.empty(T, dtype=torch.float32, device=hidden.device)
    n_valid, scale = _loss_scale(labels, ignore_index, reduction)
    grad_hidden = torch.empty((T, H), dtype=hidden.dtype, device=hidden.device) if need_gh else None
    grad_w = None
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        z, h = logits[:end - start], hidden[start:end]
        _mm_into(h, weight.t(), z)
        ce_rows(z, labels[start:end], row_loss[start:end], scale, ignore_index, grads)
        if need_gh:    # z now holds dz
            torch.mm(z, weight, out=grad_hidden[start:end])
        if need_gw:
            if grad_w is None:   # the first chunk writes: no zeroing pass
                grad_w = mm_fp32(z.t(), h) if plan.accumulates(T, hidden.dtype) else torch.mm(z.t(), h)
            else:
                _addmm_fp32_(grad_w, z.t(), h)
    del logits
    if reduction == "none":
        return row_loss, None, None
    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / n_valid
    return loss, grad_hidden, grad_w


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, budget_bytes, ce_rows):
        need_gh, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_hidden, grad_weight = _fused_forward(hidden, weight, labels, ignore_index, reduction,
                                                        budget_bytes, need_gh, need_gw, ce_rows)
        ctx.grads, ctx.weight_dtype = (grad_hidden, grad_weight), weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy computes its gradients in the forward pass and can run backward "
                               "once per forward: recompute the loss instead of using retain_graph=True")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None and grad_weight.dtype == ctx.weight_dtype:
            grad_weight.mul_(grad_loss)
        elif grad_weight is not None:     # the fp32 accumulator: scaled and rounded in one pass
            grad_weight = torch.mul(grad_weight, grad_loss,
                                    out=torch.empty(grad_weight.shape, dtype=ctx.weight_dtype, device=grad_weight.device))
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean", *,
                         budget_bytes: int = LOGITS_BUDGET_BYTES):
    """fp32 loss (a scalar; [T] per token for reduction "none"); see the module docstring.
    budget_bytes bounds the logits chunk. The torch path runs the same chunks with torch row
    ops for fp32 inputs (so a real vocabulary does not need [T, V] logits on a CPU either); other
    dtypes take the reference."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction {reduction!r} is not supported: use 'mean', 'sum' or 'none'")
    if reduction == "none" and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise ValueError("linear_cross_entropy: reduction 'none' has no backward: call it under torch.no_grad()")
    if reduction == "none" or not torch.is_grad_enabled():   # forward only: the op computes no gradients
        hidden, weight = hidden.detach(), weight.detach()
    triton_path = use_triton(hidden)
    if triton_path or (hidden.dtype == weight.dtype == torch.float32 and hidden.dim() == 2):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.dtype != weight.dtype:
            raise ValueError(f"linear_cross_entropy: hidden [T, H] and weight [V, H] of one dtype expected, got "
                             f"{tuple(hidden.shape)} {hidden.dtype} and {tuple(weight.shape)} {weight.dtype}")
        return LinearCrossEntropyFunction.apply(hidden, weight, labels.contiguous(), ignore_index, reduction,
                                                budget_bytes, triton_ce_rows if triton_path else _ce_rows_torch)
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction)
