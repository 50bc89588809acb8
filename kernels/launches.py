"""Every Triton launch the engine can make, at the real model shapes: the input of the static
compile report (bench/kernel_report.py).

Nothing here re-derives a launch. Each problem below runs the ops' own host wrappers on meta
tensors (shapes, strides and dtypes, no memory) with every Triton kernel's launch intercepted,
so a `Launch` records exactly what the dispatch would pass on an H100: arguments, constexprs,
num_warps / num_stages, and the signature and divisibility hints Triton's runtime derives from
them (its own binder, for target sm_90). Meta tensors have no SM count: the per-SM programs of
the norms' backward follow the wrappers' non-CUDA rule (a runtime int, not a compiled constant).

Shapes: hidden 896 / 1024 / 1536 / 2048, intermediate 4864 / 2816 / 8960 / 4096 / 8192, head_dim
64 / 128, GQA groups 7 / 6 / 1, vocab 151,936 / 250,880 and the Langboat reduced vocabs, bf16
and fp32. Training problems are one packed micro-batch of TOKENS tokens (SEQ_LEN-token
sequences); decode is a batch of 1 or 64 sequences with DECODE_LEN cached tokens. Each launch
carries an analytic cost (bytes a kernel must move, FLOPs) for its problem.

Build the registry with TRITON_INTERPRET unset: interpreted kernels cannot be compiled, and the
wrappers pick interpreter-only configs.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kernels.dispatch import HAS_TRITON, INTERPRETING

# the modules themselves (the package `kernels` exports the ops under the same names)
KERNEL_MODULES = tuple(importlib.import_module(f"kernels.{name}") for name in (
    "rms_norm", "layer_norm", "rope", "swiglu", "gelu", "linear_cross_entropy", "adamw", "attention",
    "decode_attention"))
rms_norm, layer_norm, rope, swiglu, gelu, linear_cross_entropy, adamw, attention, decode_attention = KERNEL_MODULES

TOKENS = 16384          # the trainer's default tokens per micro-batch
SEQ_LEN = 256           # packed sequences of 256 tokens (poems are 100-250)
DECODE_LEN = 512        # cached tokens per sequence in a decode step
ADAMW_NUMEL = 500_000_000


@dataclass(frozen=True)
class Model:
    name: str
    family: str          # "qwen2" (RMSNorm, rope, SwiGLU) or "bloom" (LayerNorm, ALiBi, GELU)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def _model(name: str) -> Model:
    from models.config import ModelConfig
    from models.registry import REGISTRY
    c = ModelConfig.from_dict(REGISTRY[name].config, name)
    return Model(name, c.model_type, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                 c.vocab_size)


def _paper_models() -> list[Model]:
    from models.registry import PAPER_MODELS
    return [_model(name) for name in PAPER_MODELS]


MODELS = _paper_models()     # the Langboat BLOOMs' reduced vocabularies are not multiples of 16
DTYPES = (torch.bfloat16, torch.float32)


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
        consts = [f"{k}={_short(v)}" for k, v in self.constexprs.items()]
        return " ".join(consts + [f"w{self.options['num_warps']}", f"s{self.options['num_stages']}"])

    def key(self) -> tuple:
        """Identifies one compiled binary."""
        return (self.kernel.__name__, tuple(self.signature.items()), tuple((k, str(v)) for k, v in self.constexprs.items()),
                str(sorted(self.attrs.items())), tuple(sorted(self.options.items())))

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
        return Launch(self.kernel, self.signature, constexprs, self.attrs, options, self.shape, self.cost, self.grid,
                      self.models, self.representative)


def _short(value) -> str:
    return str(value).replace("triton.language.", "")


# ---------------------------------------------------------------------------------------------
# Intercepting the wrappers' launches
# ---------------------------------------------------------------------------------------------

def _jit_functions():
    from triton.runtime.jit import JITFunction
    return [obj for module in KERNEL_MODULES for obj in vars(module).values() if isinstance(obj, JITFunction)]


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


_BACKEND = None


def _sm90_backend():
    global _BACKEND
    if _BACKEND is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        _BACKEND = make_backend(GPUTarget("cuda", 90, 32))
    return _BACKEND


def _specialize(kernel, args, kwargs):
    """(signature, constexprs by name, attrs, options) as Triton's runtime derives them at launch."""
    from triton.runtime.jit import create_function_from_signature
    backend = _sm90_backend()
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = {(i,): name for i, name in enumerate(kernel.arg_names)}
    return (signature, {names[path]: value for path, value in constexprs.items()}, attrs,
            {"num_warps": options.num_warps, "num_stages": options.num_stages})


def _problem(run: Callable[[], None], costs: dict[str, Callable[[Launch], Cost]], shape: str) -> list[Launch]:
    """The distinct launches `run` makes, each with the cost its kernel's entry in `costs` gives
    for it (the launch's constexprs and grid are known by then)."""
    with _captured_launches() as calls:
        run()
    launches, seen = [], set()
    for kernel, grid, args, kwargs in calls:
        launch = Launch(kernel, *_specialize(kernel, args, kwargs), shape=shape, cost=None, grid=tuple(grid))
        if launch.key() in seen:
            continue    # e.g. the loss's chunk loop: the first chunk stands for all of them
        seen.add(launch.key())
        if kernel.__name__ not in costs:
            raise KeyError(f"no cost model for {kernel.__name__}: add one to kernels/launches.py")
        launch.cost = costs[kernel.__name__](launch)
        launches.append(launch)
    return launches


def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def _tag(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


# ---------------------------------------------------------------------------------------------
# Problems: one per op, model and dtype
# ---------------------------------------------------------------------------------------------

def _norm(m: Model, dtype) -> list[Launch]:
    """Forward and backward of the model's norm: RMSNorm with and without the fused residual
    (Qwen2), LayerNorm (BLOOM)."""
    T, H, es = TOKENS, m.hidden, dtype.itemsize
    x, dy = _meta(T, H, dtype=dtype, grad=True), _meta(T, H, dtype=dtype)
    w, b = _meta(H, dtype=dtype, grad=True), _meta(H, dtype=dtype, grad=True)
    shape = f"{_tag(dtype)} T={T} H={H}"
    if m.family == "bloom":
        def run():
            torch.autograd.grad(layer_norm.LayerNormFunction.apply(x, w, b, 1e-5), (x, w, b), dy)
        return _problem(run, {"_layer_norm_forward_kernel": lambda launch: Cost(shape, es * T * H * 2 + 8 * T, 8 * T * H),
                              "_layer_norm_backward_kernel": lambda launch: Cost(shape, es * T * H * 3 + 8 * T, 12 * T * H)},
                        shape)
    r = _meta(T, H, dtype=dtype, grad=True)

    def run():
        torch.autograd.grad(rms_norm.RMSNormFunction.apply(x, w, 1e-6, None), (x, w), dy)
        torch.autograd.grad(rms_norm.RMSNormFunction.apply(x, w, 1e-6, r), (x, w, r), (dy, dy))

    def fwd(launch):  # reads x (+ residual), writes y (+ the sum)
        return Cost(shape, es * T * H * (4 if launch.constexprs["HAS_RESIDUAL"] else 2) + 4 * T, 4 * T * H)

    def bwd(launch):  # reads dy, s (+ the sum's gradient), writes dx
        return Cost(shape, es * T * H * (4 if launch.constexprs["HAS_DS_OUT"] else 3) + 4 * T, 8 * T * H)

    return _problem(run, {"_rms_norm_forward_kernel": fwd, "_rms_norm_backward_kernel": bwd}, shape)


def _rope(m: Model, dtype) -> list[Launch]:
    T, D, heads = TOKENS, m.head_dim, m.heads + m.kv_heads
    q, k = _meta(T, m.heads, D, dtype=dtype, grad=True), _meta(T, m.kv_heads, D, dtype=dtype, grad=True)
    pos = _meta(T, dtype=torch.int64)
    shape = f"{_tag(dtype)} T={T} {m.heads}/{m.kv_heads} heads d{D}"

    def run():
        torch.autograd.grad(rope.RopeFunction.apply(q, k, pos, 1e6), (q, k), (torch.empty_like(q), torch.empty_like(k)))

    return _problem(run, {"_rope_kernel": lambda launch: Cost(shape, 2 * dtype.itemsize * T * heads * D + 8 * T,
                                                         3 * T * heads * D)}, shape)


def _mlp_gate(m: Model, dtype) -> list[Launch]:
    """SwiGLU (Qwen2) or GELU (BLOOM), forward and backward, on [T, intermediate]."""
    T, I, es = TOKENS, m.intermediate, dtype.itemsize
    shape = f"{_tag(dtype)} T={T} I={I}"
    a, b, dy = _meta(T, I, dtype=dtype, grad=True), _meta(T, I, dtype=dtype, grad=True), _meta(T, I, dtype=dtype)
    if m.family == "bloom":
        return _problem(lambda: torch.autograd.grad(gelu.GELUFunction.apply(a), a, dy),
                        {"_gelu_forward_kernel": lambda launch: Cost(shape, es * T * I * 2, 10 * T * I),
                         "_gelu_backward_kernel": lambda launch: Cost(shape, es * T * I * 3, 20 * T * I)}, shape)
    return _problem(lambda: torch.autograd.grad(swiglu.SwiGLUFunction.apply(a, b), (a, b), dy),
                    {"_swiglu_forward_kernel": lambda launch: Cost(shape, es * T * I * 3, 6 * T * I),
                     "_swiglu_backward_kernel": lambda launch: Cost(shape, es * T * I * 5, 12 * T * I)}, shape)


def _loss(m: Model, dtype) -> list[Launch]:
    """The fused output layer + cross-entropy: the per-row softmax kernel on fp32 logit chunks,
    training (writes dlogits) and evaluation (loss only)."""
    T, H, V = TOKENS, m.hidden, m.vocab
    h, w = _meta(T, H, dtype=dtype, grad=True), _meta(V, H, dtype=dtype, grad=True)
    labels = _meta(T, dtype=torch.int64)
    shape = f"{_tag(dtype)} T={T} V={V}"

    def run():
        budget, rows = linear_cross_entropy.LOGITS_BUDGET_BYTES, linear_cross_entropy._ce_rows
        linear_cross_entropy.LinearCrossEntropyFunction.apply(h, w, labels, -100, "mean", budget, rows)
        linear_cross_entropy.LinearCrossEntropyFunction.apply(h.detach(), w.detach(), labels, -100, "mean", budget,
                                                              rows)

    def ce_rows(launch):  # one chunk; training reads it twice (lse, then softmax) and writes dlogits
        rows, train = launch.grid[0], launch.constexprs["WRITE_GRAD"]
        per_row = V * (8 + dtype.itemsize) if train else 4 * V
        return Cost(f"{shape}, chunk of {rows} rows", rows * per_row + 16 * rows, (6 if train else 3) * rows * V)

    return _problem(run, {"_ce_rows_kernel": ce_rows}, shape)


def _adamw(dtype) -> list[Launch]:
    """One AdamW step over a flat buffer: bf16 grads and model copy (fp32 masters) or fp32 throughout;
    an odd size too (Triton specializes n on divisibility by 16)."""
    launches = []
    for n in (ADAMW_NUMEL, ADAMW_NUMEL + 1):
        master, m_, v_ = _meta(n), _meta(n), _meta(n)
        grad = _meta(n, dtype=dtype)
        params = None if dtype == torch.float32 else [_meta(n, dtype=dtype)]
        shape = f"{_tag(dtype)} grads, n={n:,}"
        per_elem = 24 + dtype.itemsize + (dtype.itemsize if params else 0)
        launches += _problem(lambda: adamw.adamw_step_triton([master], [grad], [m_], [v_], params, step=1, lr=1e-3,
                                                             beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
                             {"_adamw_kernel": lambda launch: Cost(shape, per_elem * n, 15 * n)}, shape)
    return launches


def _attention(m: Model, dtype) -> list[Launch]:
    """Varlen causal FlashAttention forward and backward (ALiBi for BLOOM)."""
    T, D, Hq, Hkv, es = TOKENS, m.head_dim, m.heads, m.kv_heads, dtype.itemsize
    n_seqs = T // SEQ_LEN
    pairs = n_seqs * SEQ_LEN * (SEQ_LEN + 1) / 2   # causal (query, key) pairs per head
    tc = dtype != torch.float32                    # fp32 inputs use IEEE fp32 dots (CUDA cores)
    q = _meta(T, Hq, D, dtype=dtype, grad=True)
    k, v = _meta(T, Hkv, D, dtype=dtype, grad=True), _meta(T, Hkv, D, dtype=dtype, grad=True)
    cu = _meta(n_seqs + 1, dtype=torch.int32)
    slopes = _meta(Hq) if m.family == "bloom" else None
    shape = (f"{_tag(dtype)} T={T} ({n_seqs}x{SEQ_LEN}) {Hq}/{Hkv} heads d{D}"
             + (" ALiBi" if slopes is not None else ""))
    qkv_bytes = es * T * D * (Hq + 2 * Hkv)

    def run():
        out, lse2 = attention._flash_forward(q, k, v, cu, SEQ_LEN, slopes, True, D ** -0.5)
        attention._flash_backward(torch.empty_like(out), q, k, v, out, lse2, cu, SEQ_LEN, slopes, True, D ** -0.5)

    return _problem(run, {
        "_attn_fwd_kernel": lambda launch: Cost(shape, qkv_bytes + es * T * Hq * D + 4 * T * Hq, 4 * D * Hq * pairs, tc),
        "_attn_bwd_preprocess_kernel": lambda launch: Cost(shape, 2 * es * T * Hq * D + 4 * T * Hq, 2 * T * Hq * D),
        "_attn_bwd_dkdv_kernel": lambda launch: Cost(shape, qkv_bytes + es * T * D * (Hq + 2 * Hkv) + 8 * T * Hq,
                                                8 * D * Hq * pairs, tc),
        "_attn_bwd_dq_kernel": lambda launch: Cost(shape, qkv_bytes + 2 * es * T * Hq * D + 8 * T * Hq,
                                              6 * D * Hq * pairs, tc),
    }, shape)


def _decode(m: Model, dtype, batch: int) -> list[Launch]:
    """One decode step's attention over caches of DECODE_LEN tokens, with the automatic split rule."""
    D, Hq, Hkv, es, L = m.head_dim, m.heads, m.kv_heads, dtype.itemsize, DECODE_LEN
    q = _meta(batch, Hq, D, dtype=dtype)
    k_cache, v_cache = _meta(batch, Hkv, L, D, dtype=dtype), _meta(batch, Hkv, L, D, dtype=dtype)
    seqlens = _meta(batch, dtype=torch.int32)
    slopes = _meta(Hq) if m.family == "bloom" else None
    shape = f"{_tag(dtype)} batch {batch} x {L} cached, {Hq}/{Hkv} heads d{D}" + (" ALiBi" if slopes is not None else "")

    def partials(splits):
        return 0 if splits == 1 else 4 * batch * Hq * splits * (D + 1)

    def decode(launch):
        return Cost(shape, 2 * es * batch * Hkv * L * D + 2 * es * batch * Hq * D + partials(launch.grid[2]),
                    4 * batch * Hq * L * D, dtype != torch.float32)

    def combine(launch):
        splits = launch.constexprs["NUM_SPLITS"]
        return Cost(shape, partials(splits) + es * batch * Hq * D, 3 * batch * Hq * D * splits)

    return _problem(lambda: decode_attention._decode_triton(q, k_cache, v_cache, seqlens, None, slopes, D ** -0.5, None),
                    {"_decode_kernel": decode, "_decode_combine_kernel": combine}, shape)


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


def registry() -> list[Launch]:
    """Every distinct launch (kernel, compiled config, problem shape); models with identical
    problems share one entry."""
    if not HAS_TRITON:
        raise RuntimeError("the launch registry needs triton: pip install triton")
    if INTERPRETING:
        raise RuntimeError("build the launch registry with TRITON_INTERPRET unset: interpreted kernels cannot be "
                           "compiled and the wrappers choose interpreter-only configs under it")
    problems = []
    for dtype in DTYPES:
        problems.append(("adamw", "", dtype, lambda d=dtype: _adamw(d)))
        for m in MODELS:
            ops = {"norm": _norm, "mlp": _mlp_gate, "loss": _loss, "attention": _attention}
            if m.family == "qwen2":
                ops["rope"] = _rope
            for op, fn in ops.items():
                problems.append((op, m.name, dtype, lambda f=fn, m=m, d=dtype: f(m, d)))
            for batch in (1, 64):
                problems.append((f"decode{batch}", m.name, dtype, lambda m=m, d=dtype, b=batch: _decode(m, d, b)))
    entries: dict[tuple, Launch] = {}
    for op, model, dtype, build in problems:
        for launch in build():
            same = entries.setdefault((launch.key(), launch.shape), launch)
            if model:
                same.models.append(model)
            same.representative |= (op, model, _tag(dtype)) in REPRESENTATIVE
    return sorted(entries.values(), key=lambda e: (e.name, e.config, e.shape))


def roofline_seconds(cost: Cost, matmul_flops: float = 780e12, fp32_flops: float = 67e12,
                     bandwidth: float = 3.0e12) -> float:
    """The H100 lower bound for `cost`: measured bf16 matmul and copy ceilings (KERNELS.md), the
    datasheet fp32 CUDA-core rate for everything that is not a bf16 tensor-core matmul."""
    return max(cost.bytes / bandwidth, cost.flops / (matmul_flops if cost.tensor_core else fp32_flops))
