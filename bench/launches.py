"""Every Triton launch the engine can make, at the real model shapes: the input of the static
compile report (bench/kernel_report.py, `python cli.py kernels`).

Nothing here re-derives a launch. Each problem below runs the ops' own host functions on meta
tensors (shapes, strides and dtypes, no memory) with every Triton kernel's launch intercepted,
inside `kernels.launch.target(hw)`: a `Launch` records exactly what the ops would pass on that
GPU (arguments, constexprs, num_warps / num_stages, and the signature and divisibility hints
Triton's runtime derives from them, with its own binder for hw's compute capability).

Shapes come from the models registry (models.registry.PAPER_MODELS: hidden 896 / 1024 / 1536 /
2048, head_dim 64 / 128, GQA groups 7 / 6 / 1, vocab 151,936 / 250,880 and the Langboat reduced
vocabs), in bf16 and fp32. Training problems are one packed micro-batch of TOKENS tokens
(SEQ_LEN-token sequences); decode is a batch of 1 or 64 sequences with DECODE_LEN cached tokens.
Each launch carries an analytic cost (bytes a kernel must move, FLOPs) for its problem, and
`roofline_seconds` turns it into a lower bound on a kernels.hardware.Hardware.

Build the registry with TRITON_INTERPRET unset: interpreted kernels cannot be compiled, and the
ops pick interpreter-only configs under it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

import kernels.adamw as adamw_ops
import kernels.attention as attention_ops
import kernels.decode_attention as decode_ops
import kernels.gelu as gelu_ops
import kernels.layer_norm as layer_norm_ops
import kernels.linear_cross_entropy as loss_ops
import kernels.rms_norm as rms_norm_ops
import kernels.rope as rope_ops
import kernels.swiglu as swiglu_ops
from kernels.dispatch import HAS_TRITON, INTERPRETING
from kernels.hardware import Hardware
from kernels.launch import target
from models.config import ModelConfig

KERNEL_MODULES = (rms_norm_ops, layer_norm_ops, rope_ops, swiglu_ops, gelu_ops, loss_ops, adamw_ops, attention_ops,
                  decode_ops)

# The trainer's default micro-batch: memorize's default 8192 tokens per step, one micro-batch per
# step (engine/train.py, TrainConfig.resolved). The engine exposes no constant for it yet.
TOKENS = 8192
SEQ_LEN = 256           # packed sequences of 256 tokens (poems are 100-250)
DECODE_LEN = 512        # cached tokens per sequence in a decode step
ADAMW_NUMEL = 500_000_000
DTYPES = (torch.bfloat16, torch.float32)


def paper_models() -> list[tuple[str, ModelConfig]]:
    """(name, architecture) of the paper's models, from the registry's built-in configs. The
    Langboat BLOOMs' reduced vocabularies are not multiples of 16."""
    from models.registry import PAPER_MODELS, REGISTRY
    return [(name, ModelConfig.from_dict(REGISTRY[name].config, name)) for name in PAPER_MODELS]


@dataclass(frozen=True)
class Cost:
    problem: str          # the problem size the numbers are for
    bytes: float          # bytes the kernel must read and write (each operand once unless stated)
    flops: float
    tensor_core: bool = False   # FLOPs are bf16 tensor-core matmuls (else fp32 on CUDA cores)


@dataclass
class Launch:
    kernel: Any                   # the @triton.jit function
    signature: dict[str, str]     # argument -> "*bf16", "i32", "fp32", "constexpr", ...
    constexprs: dict[str, Any]
    attrs: dict                   # Triton's divisibility hints: {(arg index,): [["tt.divisibility", 16]]}
    options: dict                 # num_warps, num_stages
    shape: str                    # human-readable problem, e.g. "bf16 T=16384 H=896"
    cost: Cost
    grid: tuple = ()
    models: list[str] = field(default_factory=list)
    representative: bool = False  # in the default test run

    @property
    def name(self) -> str:
        return self.kernel.__name__.strip("_")

    @property
    def config(self) -> str:
        """The compiled constants in short form: constexprs, then warps and stages."""
        consts = [f"{k}={str(v).replace('triton.language.', '')}" for k, v in self.constexprs.items()]
        return " ".join(consts + [f"w{self.options['num_warps']}", f"s{self.options['num_stages']}"])

    def key(self) -> tuple:
        """Identifies one compiled binary."""
        return (self.kernel.__name__, tuple(self.signature.items()),
                tuple((k, str(v)) for k, v in self.constexprs.items()), str(sorted(self.attrs.items())),
                tuple(sorted(self.options.items())))

    def with_changes(self, **changes) -> "Launch":
        """A copy with some constexprs or options (num_warps, num_stages) replaced: what-if configs."""
        constexprs, options = dict(self.constexprs), dict(self.options)
        for k, v in changes.items():
            if k in options:
                options[k] = v
            elif k in constexprs:
                constexprs[k] = v
            else:
                raise KeyError(f"{self.name}: {k!r} is neither a constexpr ({', '.join(constexprs)}) nor an option "
                               f"({', '.join(options)})")
        return replace(self, constexprs=constexprs, options=options)


# ---------------------------------------------------------------------------------------------
# Intercepting the wrappers' launches
# ---------------------------------------------------------------------------------------------

def _jit_functions():
    """Every @triton.jit function the ops' modules hold (shared device helpers appear in several)."""
    from triton.runtime.jit import JITFunction
    found = {id(obj): obj for module in KERNEL_MODULES for obj in vars(module).values() if isinstance(obj, JITFunction)}
    return list(found.values())


@contextlib.contextmanager
def _captured_launches():
    """Within the block, `kernel[grid](...)` records (kernel, grid, args, kwargs) instead of running."""
    calls = []
    kernels = _jit_functions()

    def recorder(kernel):
        return lambda *args, grid, warmup, **kwargs: calls.append((kernel, grid, args, kwargs))

    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        yield calls
    finally:
        for kernel in kernels:
            del kernel.run


def _specialize(kernel, args, kwargs, backend):
    """(signature, constexprs by name, attrs, options) as Triton's runtime derives them at launch."""
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = {(i,): name for i, name in enumerate(kernel.arg_names)}
    return (signature, {names[path]: value for path, value in constexprs.items()}, attrs,
            {"num_warps": options.num_warps, "num_stages": options.num_stages})


@dataclass(frozen=True)
class Problem:
    run: Callable[[], None]                        # calls the ops' host functions on meta tensors
    costs: dict[str, Callable[[Launch], Cost]]     # kernel __name__ -> its cost for one launch
    shape: str


def _record(problem: Problem, backend) -> list[Launch]:
    """The distinct launches `problem.run` makes, each with the cost its kernel's entry in
    `problem.costs` gives for it (the launch's constexprs and grid are known by then)."""
    with _captured_launches() as calls:
        problem.run()
    launches, seen = [], set()
    for kernel, grid, args, kwargs in calls:
        launch = Launch(kernel, *_specialize(kernel, args, kwargs, backend), shape=problem.shape, cost=None,
                        grid=tuple(grid))
        if launch.key() in seen:
            continue    # e.g. the loss's chunk loop: the first chunk stands for all of them
        seen.add(launch.key())
        if kernel.__name__ not in problem.costs:
            raise KeyError(f"no cost model for {kernel.__name__}: add one to bench/launches.py")
        launch.cost = problem.costs[kernel.__name__](launch)
        launches.append(launch)
    return launches


def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def _tag(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


# ---------------------------------------------------------------------------------------------
# Problems: one per op, model and dtype
# ---------------------------------------------------------------------------------------------

def _norm(c: ModelConfig, dtype) -> list[Problem]:
    """Forward and backward of the model's norm, with and without the fused residual: RMSNorm (Qwen2),
    LayerNorm (BLOOM)."""
    T, H, es = TOKENS, c.hidden_size, dtype.itemsize
    x, dy = _meta(T, H, dtype=dtype, grad=True), _meta(T, H, dtype=dtype)
    w, b = _meta(H, dtype=dtype, grad=True), _meta(H, dtype=dtype, grad=True)
    r = _meta(T, H, dtype=dtype, grad=True)
    shape = f"{_tag(dtype)} T={T} H={H}"
    bloom = c.model_type == "bloom"
    stats = 8 if bloom else 4     # fp32 mean and rstd, or rstd, per row

    def fwd(launch):  # reads x (+ residual), writes y (+ the sum)
        return Cost(shape, es * T * H * (4 if launch.constexprs["HAS_RESIDUAL"] else 2) + stats * T,
                    (8 if bloom else 4) * T * H)

    def bwd(launch):  # reads dy, s (+ the sum's gradient), writes dx
        return Cost(shape, es * T * H * (4 if launch.constexprs["HAS_DS_OUT"] else 3) + stats * T,
                    (12 if bloom else 8) * T * H)

    if bloom:
        def run():
            torch.autograd.grad(layer_norm_ops.LayerNormFunction.apply(x, w, b, 1e-5, None), (x, w, b), dy)
            torch.autograd.grad(layer_norm_ops.LayerNormFunction.apply(x, w, b, 1e-5, r), (x, w, b, r), (dy, dy))
        return [Problem(run, {"_layer_norm_forward_kernel": fwd, "_layer_norm_backward_kernel": bwd}, shape)]

    def run():
        torch.autograd.grad(rms_norm_ops.RMSNormFunction.apply(x, w, 1e-6, None), (x, w), dy)
        torch.autograd.grad(rms_norm_ops.RMSNormFunction.apply(x, w, 1e-6, r), (x, w, r), (dy, dy))

    return [Problem(run, {"_rms_norm_forward_kernel": fwd, "_rms_norm_backward_kernel": bwd}, shape)]


def _rope(c: ModelConfig, dtype) -> list[Problem]:
    T, D, heads = TOKENS, c.head_dim, c.num_heads + c.num_kv_heads
    q, k = _meta(T, c.num_heads, D, dtype=dtype, grad=True), _meta(T, c.num_kv_heads, D, dtype=dtype, grad=True)
    pos = _meta(T, dtype=torch.int64)
    shape = f"{_tag(dtype)} T={T} {c.num_heads}/{c.num_kv_heads} heads d{D}"

    def run():
        torch.autograd.grad(rope_ops.RopeFunction.apply(q, k, pos, 1e6), (q, k),
                            (torch.empty_like(q), torch.empty_like(k)))

    return [Problem(run, {"_rope_kernel": lambda launch: Cost(shape, 2 * dtype.itemsize * T * heads * D + 8 * T,
                                                              3 * T * heads * D)}, shape)]


def _mlp_gate(c: ModelConfig, dtype) -> list[Problem]:
    """SwiGLU (Qwen2) or GELU (BLOOM), forward and backward, on [T, intermediate]."""
    T, I, es = TOKENS, c.intermediate_size, dtype.itemsize
    shape = f"{_tag(dtype)} T={T} I={I}"
    a, dy = _meta(T, I, dtype=dtype, grad=True), _meta(T, I, dtype=dtype)
    if c.model_type == "bloom":
        return [Problem(lambda: torch.autograd.grad(gelu_ops.GELUFunction.apply(a), a, dy),
                        {"_gelu_forward_kernel": lambda launch: Cost(shape, es * T * I * 2, 10 * T * I),
                         "_gelu_backward_kernel": lambda launch: Cost(shape, es * T * I * 3, 20 * T * I)}, shape)]
    gate_up = _meta(T, 2 * I, dtype=dtype, grad=True)
    return [Problem(lambda: torch.autograd.grad(swiglu_ops.SwiGLUFunction.apply(gate_up), gate_up, dy),
                    {"_swiglu_forward_kernel": lambda launch: Cost(shape, es * T * I * 3, 6 * T * I),
                     "_swiglu_backward_kernel": lambda launch: Cost(shape, es * T * I * 5, 12 * T * I)}, shape)]


def _loss(c: ModelConfig, dtype) -> list[Problem]:
    """The fused output layer + cross-entropy: the per-row softmax kernel on logit chunks, training
    (logits in the inputs' dtype, dlogits written over them) and evaluation (fp32 logits, loss only)."""
    T, H, V = TOKENS, c.hidden_size, c.vocab_size
    h, w = _meta(T, H, dtype=dtype, grad=True), _meta(V, H, dtype=dtype, grad=True)
    labels = _meta(T, dtype=torch.int64)
    shape = f"{_tag(dtype)} T={T} V={V}"

    def run():
        budget, rows = loss_ops.LOGITS_BUDGET_BYTES, loss_ops.triton_ce_rows
        loss_ops.LinearCrossEntropyFunction.apply(h, w, labels, -100, "mean", budget, rows)
        loss_ops.LinearCrossEntropyFunction.apply(h.detach(), w.detach(), labels, -100, "mean", budget, rows)

    def ce_rows(launch):  # one chunk; training: its logits (the inputs' dtype) read twice, dlogits written over them
        rows, train = launch.grid[0], launch.constexprs["WRITE_GRAD"]
        per_row = 3 * dtype.itemsize * V if train else 4 * V
        return Cost(f"{shape}, chunk of {rows} rows", rows * per_row + 12 * rows, (6 if train else 3) * rows * V)

    return [Problem(run, {"_ce_rows_kernel": ce_rows}, shape)]


def _adamw(n: int, dtype) -> Problem:
    """One AdamW step over a flat buffer of n: bf16 grads and model copy (fp32 masters) or fp32
    throughout."""
    master, exp_avg, exp_avg_sq, grad = _meta(n), _meta(n), _meta(n), _meta(n, dtype=dtype)
    params = None if dtype == torch.float32 else [_meta(n, dtype=dtype)]
    shape = f"{_tag(dtype)} grads, n={n:,}"
    per_elem = adamw_ops.bytes_per_element(dtype.itemsize, params and dtype.itemsize, zero_grads=True)

    def run():  # as engine.optim steps: the clipping factor applied and the gradients zeroed in the pass
        adamw_ops.adamw_step_triton([master], [grad], [exp_avg], [exp_avg_sq], params, step=1, lr=1e-3, beta1=0.9,
                                    beta2=0.999, eps=1e-8, weight_decay=0.01, grad_scale=_meta(1),
                                    zero_grads=True)

    return Problem(run, {"_adamw_kernel": lambda launch: Cost(shape, per_elem * n, 15 * n)}, shape)


def _attention(c: ModelConfig, dtype) -> list[Problem]:
    """Varlen causal FlashAttention forward and backward (ALiBi for BLOOM)."""
    T, D, Hq, Hkv, es = TOKENS, c.head_dim, c.num_heads, c.num_kv_heads, dtype.itemsize
    n_seqs = T // SEQ_LEN
    pairs = n_seqs * SEQ_LEN * (SEQ_LEN + 1) / 2   # causal (query, key) pairs per head
    tc = dtype != torch.float32                    # fp32 inputs use IEEE fp32 dots (CUDA cores)
    q = _meta(T, Hq, D, dtype=dtype, grad=True)
    k, v = _meta(T, Hkv, D, dtype=dtype, grad=True), _meta(T, Hkv, D, dtype=dtype, grad=True)
    cu = _meta(n_seqs + 1, dtype=torch.int32)
    slopes = _meta(Hq) if c.model_type == "bloom" else None
    shape = (f"{_tag(dtype)} T={T} ({n_seqs}x{SEQ_LEN}) {Hq}/{Hkv} heads d{D}"
             + (" ALiBi" if slopes is not None else ""))
    qkv_bytes = es * T * D * (Hq + 2 * Hkv)

    def run():
        out, lse2 = attention_ops.flash_attention_forward(q, k, v, cu, SEQ_LEN, slopes, True, D ** -0.5)
        attention_ops.flash_attention_backward(torch.empty_like(out), q, k, v, out, lse2, cu, SEQ_LEN, slopes, True,
                                               D ** -0.5)

    return [Problem(run, {
        "_attn_fwd_kernel": lambda launch: Cost(shape, qkv_bytes + es * T * Hq * D + 4 * T * Hq,
                                                4 * D * Hq * pairs, tc),
        "_attn_bwd_preprocess_kernel": lambda launch: Cost(shape, 2 * es * T * Hq * D + 4 * T * Hq, 2 * T * Hq * D),
        "_attn_bwd_dkdv_kernel": lambda launch: Cost(shape, qkv_bytes + es * T * D * (Hq + 2 * Hkv) + 8 * T * Hq,
                                                     8 * D * Hq * pairs, tc),
        "_attn_bwd_dq_kernel": lambda launch: Cost(shape, qkv_bytes + 2 * es * T * Hq * D + 8 * T * Hq,
                                                   6 * D * Hq * pairs, tc),
    }, shape)]


def _decode(c: ModelConfig, dtype, batch: int) -> list[Problem]:
    """One decode step's attention over caches of DECODE_LEN tokens, with the automatic split rule."""
    D, Hq, Hkv, es, L = c.head_dim, c.num_heads, c.num_kv_heads, dtype.itemsize, DECODE_LEN
    q = _meta(batch, Hq, D, dtype=dtype)
    k_cache, v_cache = _meta(batch, Hkv, L, D, dtype=dtype), _meta(batch, Hkv, L, D, dtype=dtype)
    seqlens = _meta(batch, dtype=torch.int32)
    slopes = _meta(Hq) if c.model_type == "bloom" else None
    shape = (f"{_tag(dtype)} batch {batch} x {L} cached, {Hq}/{Hkv} heads d{D}"
             + (" ALiBi" if slopes is not None else ""))

    def partials(splits):
        return 0 if splits == 1 else 4 * batch * Hq * splits * (D + 1)

    def decode(launch):
        return Cost(shape, 2 * es * batch * Hkv * L * D + 2 * es * batch * Hq * D + partials(launch.grid[2]),
                    4 * batch * Hq * L * D, dtype != torch.float32)

    def combine(launch):
        splits = launch.constexprs["NUM_SPLITS"]
        return Cost(shape, partials(splits) + es * batch * Hq * D, 3 * batch * Hq * D * splits)

    def run():
        decode_ops.triton_decode_attention(q, k_cache, v_cache, seqlens, None, slopes, D ** -0.5, None)

    return [Problem(run, {"_decode_kernel": decode, "_decode_combine_kernel": combine}, shape)]


# Problems per model: op -> builder; the norm, MLP gate and position encoding follow the family.
MODEL_OPS = {"norm": _norm, "rope": _rope, "mlp": _mlp_gate, "loss": _loss, "attention": _attention,
             "decode1": lambda c, dtype: _decode(c, dtype, 1), "decode64": lambda c, dtype: _decode(c, dtype, 64)}

# The default test run: every kernel at least once, both dtypes where the code path differs
# (dot operand dtype, dlogits dtype, the optimizer's grad/param dtypes). Attention's fp32 (IEEE
# dot) variants are the slowest compiles and are left to the full report; decode covers the fp32
# dot path here.
REPRESENTATIVE = {("norm", "qwen2-1.5b", "bf16"), ("norm", "qwen2-0.5b", "fp32"), ("norm", "bloom-1b7", "bf16"),
                  ("rope", "qwen2-0.5b", "bf16"), ("mlp", "qwen2-1.5b", "bf16"), ("mlp", "bloom-1b7", "bf16"),
                  ("loss", "qwen2-0.5b", "bf16"), ("loss", "qwen2-0.5b", "fp32"), ("adamw", "", "bf16"),
                  ("adamw", "", "fp32"), ("attention", "qwen2-1.5b", "bf16"), ("attention", "qwen2-0.5b", "bf16"),
                  ("attention", "bloom-1b7", "fp32"), ("decode1", "qwen2-1.5b", "bf16"),
                  ("decode64", "qwen2-0.5b", "fp32")}


def _problems():
    """(op, model name or "", dtype, problems) for every problem the registry records."""
    for dtype in DTYPES:
        # an odd size too: Triton specializes n on divisibility by 16
        yield "adamw", "", dtype, [_adamw(n, dtype) for n in (ADAMW_NUMEL, ADAMW_NUMEL + 1)]
        for name, c in paper_models():
            for op, build in MODEL_OPS.items():
                if op != "rope" or c.model_type == "qwen2":
                    yield op, name, dtype, build(c, dtype)


def registry(hw: Hardware) -> list[Launch]:
    """Every distinct launch (kernel, compiled config, problem shape) the ops make when choosing
    their configurations for `hw`; models with identical problems share one entry."""
    if not HAS_TRITON:
        raise RuntimeError("the launch registry needs triton: pip install triton")
    if INTERPRETING:
        raise RuntimeError("build the launch registry with TRITON_INTERPRET unset: interpreted kernels cannot be "
                           "compiled and the ops choose interpreter-only configs under it")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    backend = make_backend(GPUTarget("cuda", hw.arch, 32))
    entries: dict[tuple, Launch] = {}
    with target(hw):
        for op, model, dtype, problems in _problems():
            for launch in (launch for problem in problems for launch in _record(problem, backend)):
                same = entries.setdefault((launch.key(), launch.shape), launch)
                if model:
                    same.models.append(model)
                same.representative |= (op, model, _tag(dtype)) in REPRESENTATIVE
    return sorted(entries.values(), key=lambda e: (e.name, e.config, e.shape))


def roofline_seconds(cost: Cost, hw: Hardware) -> float:
    """The lower bound for `cost` on `hw`: its bf16 matmul and copy ceilings (measured where the
    table has them), the datasheet fp32 CUDA-core rate for everything that is not a bf16
    tensor-core matmul."""
    flops = hw.roofline_matmul_flops if cost.tensor_core else hw.peak_fp32_flops
    return max(cost.bytes / hw.roofline_bytes_per_second, cost.flops / flops)
