"""Output layer fused with cross-entropy: the logits are never materialized whole.

hidden [T, H], weight [V, H] (the output matrix, tied or not), labels [T] int64 with
ignore_index (-100) on tokens that carry no loss. loss_t = logsumexp(hidden_t . W^T) -
hidden_t . W[labels_t], computed in fp32. reduction "mean": sum over valid tokens / their
count; "sum": the sum (the training loop divides by a global token count); "none": the fp32
per-token losses [T], 0 on ignored tokens, forward only (scoring: engine/scoring.py). With every
label ignored, "mean" is 0/0 = NaN as in torch (gradients are then zero); "sum" is 0.

Chunked path (Triton: fp32 or bf16 hidden/weight of one dtype; torch: fp32, the CPU default,
with the row step in torch ops instead of the Triton kernel). Tokens are processed in chunks of C
rows, C chosen by `chunk_plan` from a memory budget for the fp32 logits chunk [C, V] (not
from V/H, so the GEMMs stay large), with no host synchronization anywhere. Per chunk:
    z = h_c @ W^T                       cuBLAS, bf16 inputs, fp32 output [C, V]
    one program per row: lse = logsumexp(z) (online, fp32), loss_t = lse - z[label], then
    dz = (softmax(z) - onehot(label)) * scale (scale = 1 / n_valid for "mean", a device
    tensor; 0 on ignored rows), stored in the matmul dtype into the gradient group's rows
and per group of G rows (G >= C, from a second budget for bf16 dz [G, V]; for fp32
inputs dz overwrites z in place and G = C):
    grad_h[g] = dz_g @ W                [G, H], hidden's dtype
    grad_W  (+)= dz_g^T @ h_g           [V, H]: the first group writes the fp32 accumulator (no
                                        zeroing pass), later ones add; with a single group and
                                        bf16 inputs, written straight in bf16 (no accumulator)
Groups cut the passes over W and over the fp32 grad_W ([V, H], 545 MB at Qwen2-0.5B) from one
per chunk to one per group: `traffic` counts them.
The gradients are computed in the forward pass and kept; backward scales them by the scalar
grad_output (in place: backward may run once per forward).

Why fp32 logits: a memorized token has loss ~1e-3 while its logit is ~30, where bf16 spacing
is 0.125; bf16 logits would bury the loss curve in rounding. dz lies in [-1, 1] and feeds
bf16 GEMMs, so bf16 is enough for it: it lives in a dense bf16 buffer of G rows of its own.
grad_W is accumulated in fp32 over the groups and rounded to the weight's dtype once.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.dispatch import tl, triton, use_triton
from kernels.launch import on_device

LOGITS_BUDGET_BYTES = 384 << 20  # fp32 logits chunk: 640 rows at V=151,936 (peak < 1 GB at 32K x 896)
GRADIENT_BUDGET_BYTES = 512 << 20  # bf16 dz of a gradient group: 1,664 rows at V=151,936
CHUNK_MULTIPLE = 128  # chunk rows in whole GEMM tiles


class ChunkPlan(NamedTuple):
    chunk_tokens: int  # rows of hidden per chunk
    peak_extra_bytes: int  # most memory the op holds at once beyond its inputs
    group_tokens: int = 0  # rows per gradient group (a multiple of chunk_tokens; with grads)

    def accumulates(self, T: int, dtype: torch.dtype) -> bool:
        """Whether grad_W goes through the fp32 accumulator (several groups, or fp32 anyway)."""
        return dtype == torch.float32 or self.group_tokens < T


def chunk_plan(T: int, H: int, V: int, dtype: torch.dtype, budget_bytes: int = LOGITS_BUDGET_BYTES,
               grads: bool = True, gradient_budget_bytes: int = GRADIENT_BUDGET_BYTES) -> ChunkPlan:
    """Chunk and gradient-group sizes for T tokens and the peak memory, everything the op allocates counted.

    Rows per chunk: the largest multiple of CHUNK_MULTIPLE whose fp32 logits [C, V] fit in
    budget_bytes (at least CHUNK_MULTIPLE, at most T). Rows per group: fp32, the chunk (dz is z);
    else the largest multiple of CHUNK_MULTIPLE whose dz [G, V] fits gradient_budget_bytes (at least one
    chunk, at most T; its last chunk may be short). The peak, with grads: during the loop logits + dz group +
    fp32 grad_W accumulator (if used) + grad_hidden + per-token losses; at the end accumulator + grad_W
    in `dtype` + grad_hidden + losses.
    """
    rows = max(CHUNK_MULTIPLE, budget_bytes // (4 * V) // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
    chunk = min(rows, T)
    logits = 4 * chunk * V
    per_token = 4 * T
    if not grads:
        return ChunkPlan(chunk, logits + per_token)
    size = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.float32:
        group, dz = chunk, 0
    else:
        rows = gradient_budget_bytes // (size * V) // CHUNK_MULTIPLE * CHUNK_MULTIPLE
        group = min(max(chunk, rows), T)
        dz = size * group * V
    plan = ChunkPlan(chunk, 0, group)
    grad_hidden = size * T * H
    accumulator = 4 * V * H if plan.accumulates(T, dtype) else 0
    rounded = size * V * H if accumulator and dtype != torch.float32 else 0
    peak = max(logits + dz, rounded) + accumulator + grad_hidden + per_token
    return plan._replace(peak_extra_bytes=peak)


def traffic(T: int, H: int, V: int, dtype: torch.dtype, budget_bytes: int = LOGITS_BUDGET_BYTES) -> dict[str, int]:
    """Bytes each part of a training call (gradients of hidden and weight) moves, from chunk_plan's
    chunks, as _fused_forward and backward run them: per chunk of n rows the logits GEMM (W and h
    read, fp32 z written), the row kernel (z read twice, dz written), the grad_hidden GEMM (dz and W
    read, grad_h written) and the grad_W GEMM (dz and h read, the fp32 accumulator read and written);
    once, the accumulator zeroed and rounded to the weight's dtype, and backward's scaling in place."""
    e = torch.empty((), dtype=dtype).element_size()
    plan = chunk_plan(T, H, V, dtype, budget_bytes)
    accumulates = plan.accumulates(T, dtype)
    parts = dict.fromkeys(("logits GEMM", "row kernel (lse, dz)", "grad_hidden GEMM", "grad_W GEMM",
                           "grad_W round, scale"), 0)
    for start in range(0, T, plan.chunk_tokens):
        n = min(plan.chunk_tokens, T - start)
        parts["logits GEMM"] += e * V * H + e * n * H + 4 * n * V
        parts["row kernel (lse, dz)"] += 8 * n * V + e * n * V + 8 * n
    for start in range(0, T, plan.group_tokens):
        n = min(plan.group_tokens, T - start)
        parts["grad_hidden GEMM"] += e * n * V + e * V * H + e * n * H
        # the first group writes grad_W (fp32 accumulator, or the result itself), later ones read and write it
        parts["grad_W GEMM"] += e * n * V + e * n * H + (4 if accumulates else e) * V * H * (1 if start == 0 else 2)
    rounding = (4 + e) * V * H if accumulates and dtype != torch.float32 else 0
    parts["grad_W round, scale"] = rounding + 2 * e * V * H + 2 * e * T * H
    return parts


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean"):
    logits = hidden.float() @ weight.float().t()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def ce_rows_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for _ce_rows_kernel: a row streams through blocks of BLOCK_V."""
    block = min(triton.next_power_of_2(V), 4096)
    return block, 8 if block >= 4096 else 4


@triton.jit
def _ce_rows_kernel(Z, DZ, LABELS, LOSS, SCALE, V, stride_z, stride_dz, ignore_index,
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
        z = tl.load(z_row + start + cols, mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    in_range = valid & (label >= 0) & (label < V)
    z_label = tl.load(z_row + label, mask=in_range, other=0.0)
    tl.store(LOSS + row, tl.where(valid, lse - z_label, 0.0))
    if WRITE_GRAD:
        coef = tl.where(valid, tl.load(SCALE), 0.0)
        dz_row = DZ + row * stride_dz
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(z_row + start + cols, mask=mask, other=0.0)
            g = (tl.exp(z - lse) - tl.where(start + cols == label, 1.0, 0.0)) * coef
            # dz may alias z (fp32 inputs: overwritten in place): every warp finishes its loads
            # before any store lands
            tl.debug_barrier()
            tl.store(dz_row + start + cols, g.to(DZ.dtype.element_ty), mask=mask)


def _ce_rows_torch(z, dz, labels, row_loss, scale, ignore_index):
    """`triton_ce_rows` in torch ops for fp32 on the CPU: dz is z itself, overwritten in place."""
    valid = labels != ignore_index
    lse = torch.logsumexp(z, dim=1)
    picked = z.gather(1, labels.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    row_loss.copy_(torch.where(valid, lse - picked, 0.0))
    if dz is not None:
        rows = valid.nonzero()[:, 0]
        z.sub_(lse[:, None]).exp_()
        z[rows, labels[rows]] -= 1.0
        z.mul_(torch.where(valid, scale, 0.0)[:, None])


@on_device
def triton_ce_rows(z, dz, labels, row_loss, scale, ignore_index):
    """Per-row loss into row_loss; with dz (may alias z), the scaled softmax gradient into dz."""
    n, V = z.shape
    block, num_warps = ce_rows_config(V)
    _ce_rows_kernel[(n,)](z, z if dz is None else dz, labels, row_loss, scale, V, z.stride(0),
                          z.stride(0) if dz is None else dz.stride(0), ignore_index,
                          WRITE_GRAD=dz is not None, BLOCK_V=block, num_warps=num_warps)


def mm_fp32(a, b, out=None) -> torch.Tensor:
    """a @ b with fp32 output (into `out` if given): cuBLAS writes fp32 from half inputs on a GPU
    (torch >= 2.8); elsewhere the inputs are upcast (CPU BLAS has no mixed-dtype GEMM)."""
    if a.dtype == b.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


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
    """(loss, grad_hidden or None, grad_weight or None), gradients for grad_output = 1."""
    T, H = hidden.shape
    V = weight.shape[0]
    grads = need_gh or need_gw
    plan = chunk_plan(T, H, V, hidden.dtype, budget_bytes, grads)
    chunk, group = plan.chunk_tokens, plan.group_tokens or plan.chunk_tokens
    z = torch.empty((chunk, V), dtype=torch.float32, device=hidden.device)
    dz = None
    if grads:
        dz = z if hidden.dtype == torch.float32 else torch.empty((group, V), dtype=hidden.dtype, device=hidden.device)
    row_loss = torch.empty(T, dtype=torch.float32, device=hidden.device)
    n_valid, scale = _loss_scale(labels, ignore_index, reduction)
    grad_hidden = torch.empty((T, H), dtype=hidden.dtype, device=hidden.device) if need_gh else None
    grad_w = None
    for group_start in range(0, T, group):
        group_end = min(group_start + group, T)
        for start in range(group_start, group_end, chunk):
            end = min(start + chunk, group_end)
            n, at = end - start, start - group_start
            mm_fp32(hidden[start:end], weight.t(), z[:n])
            ce_rows(z[:n], None if dz is None else dz[at:at + n], labels[start:end], row_loss[start:end], scale,
                    ignore_index)
        dz_g, h_g = (None, None) if dz is None else (dz[:group_end - group_start], hidden[group_start:group_end])
        if need_gh:
            torch.mm(dz_g, weight, out=grad_hidden[group_start:group_end])
        if need_gw:
            if grad_w is None:   # the first group writes: no zeroing pass
                grad_w = mm_fp32(dz_g.t(), h_g) if plan.accumulates(T, hidden.dtype) else torch.mm(dz_g.t(), h_g)
            else:
                _addmm_fp32_(grad_w, dz_g.t(), h_g)
    del z, dz
    if reduction == "none":
        return row_loss, None, None
    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / n_valid
    return loss, grad_hidden, None if grad_w is None else grad_w.to(weight.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, budget_bytes, ce_rows):
        need_gh, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_hidden, grad_weight = _fused_forward(hidden, weight, labels, ignore_index, reduction,
                                                        budget_bytes, need_gh, need_gw, ce_rows)
        ctx.grads = (grad_hidden, grad_weight)
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
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean", *,
                         budget_bytes: int = LOGITS_BUDGET_BYTES):
    """fp32 loss (a scalar; [T] per token for reduction "none"); see the module docstring.
    budget_bytes bounds the fp32 logits chunk. The torch path runs the same chunks with torch row
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
