"""GPU benchmark: the row and elementwise kernels (rms_norm, its fused residual add, layer_norm,
rope, swiglu, gelu) against their peers.

    python bench/bench_kernels.py --out bench/results [--quick]

For each op at real shapes (bf16, T tokens in {8K, 64K}; hidden 896/1024/1536/2048, the Qwen2
head layouts 14/2x64, 16/16x64, 12/2x128, intermediate 4864/8960/2816, BLOOM's 4H), each
implementation is timed in three modes: forward (with autograd recording, as in training),
backward (torch.autograd.grad through a kept graph) and full (both): median ms by
CUDA events (bench/common.py), GB/s over the minimum bf16 traffic, and peak memory allocated
above the inputs. Implementations: ours (Triton), torch eager (the module's reference), torch.compile
of that reference (dynamic shapes, one compile per op) and Liger-Kernel's ops when importable
(no plain GELU there). A correctness check of ours against the reference in fp32 runs first.
Writes kernels-<gpu>.json and .md under --out. About 1-2 minutes on an H100; --dry-run: the tiny
presets' shapes on the CPU under the Triton interpreter, torch.compile left out.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402  (first: it sets the interpreter up for --dry-run)
from kernels.dispatch import backend  # noqa: E402
from kernels.gelu import gelu, gelu_reference  # noqa: E402
from kernels.layer_norm import layer_norm, layer_norm_reference  # noqa: E402
from kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from kernels.rope import rope, rope_cos_sin, rope_reference  # noqa: E402
from kernels.swiglu import swiglu, swiglu_reference  # noqa: E402
from models import REGISTRY, ModelConfig  # noqa: E402

TOKENS = (8192, 65536)
QWEN = ("qwen2-0.5b", "qwen1.5-0.5b", "qwen2-1.5b")    # hidden 896/1024/1536, heads 14/2x64, 16/16x64, 12/2x128
BLOOM = ("bloom-560m", "bloom-1b7")                   # hidden 1024/2048, MLP 4H
DRY = {"tokens": (8,), "qwen": ("tiny-qwen2",), "bloom": ("tiny-bloom",)}
MODES = ("forward", "backward", "full")
EPS, THETA, SEQ_LEN = 1e-6, 1e6, 512  # rope positions restart every SEQ_LEN tokens (packed batch)


@dataclass
class Case:
    """One op at one shape. tensors: (shape, scale) of each float input, standard normal times scale;
    rope_dim: rope's head_dim (its positions, cos and sin follow the tensors); traffic: tensor elements
    the forward and the backward must at least read plus write."""
    op: str
    shape: str
    tensors: list[tuple[tuple[int, ...], float]]
    traffic: tuple[int, int]
    rope_dim: int = 0

    def make(self, dtype: torch.dtype, device) -> tuple:
        """Fresh inputs; the float ones require grad."""
        floats = tuple((scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_()
                       for shape, scale in self.tensors)
        if not self.rope_dim:
            return floats
        positions = torch.arange(floats[0].shape[0], device=device) % SEQ_LEN
        cos, sin = rope_cos_sin(positions, self.rope_dim, THETA)  # for Liger, made once per step as in HF
        return (*floats, positions, cos[None], sin[None])


def shapes(qwen: tuple[str, ...], bloom: tuple[str, ...]) -> dict[str, list]:
    """The registry's per-layer shapes: hidden sizes, Qwen2 head layouts and MLP widths, BLOOM's 4H."""
    q = [ModelConfig.from_dict(REGISTRY[n].config, n) for n in qwen]
    b = [ModelConfig.from_dict(REGISTRY[n].config, n) for n in bloom]
    unique = lambda xs: list(dict.fromkeys(xs))  # noqa: E731
    return {"hidden": unique(c.hidden_size for c in q + b),
            "rope": unique((n, c.num_heads, c.num_kv_heads, c.head_dim) for n, c in zip(qwen, q)),
            "intermediate": unique(c.intermediate_size for c in q),
            "bloom_mlp": unique(4 * c.hidden_size for c in b)}


def cases(quick: bool, dry_run: bool) -> list[Case]:
    tokens, qwen, bloom = (DRY["tokens"], DRY["qwen"], DRY["bloom"]) if dry_run else (TOKENS, QWEN, BLOOM)
    first = (lambda xs: xs[:1]) if quick else (lambda xs: xs)  # noqa: E731
    tokens, sizes = first(tokens), {k: first(v) for k, v in shapes(qwen, bloom).items()}
    out = []
    for t in tokens:
        for h in sizes["hidden"]:
            x, w = ((t, h), 1.0), ((h,), 1.0)
            out.append(Case("rms_norm", f"T={t} H={h}", [x, w], (2 * t * h, 3 * t * h)))
            out.append(Case("rms_norm_residual", f"T={t} H={h}", [x, x, w], (4 * t * h, 4 * t * h)))
            out.append(Case("layer_norm", f"T={t} H={h}", [x, w, ((h,), 0.1)], (2 * t * h, 3 * t * h)))
        for model, hq, hkv, d in sizes["rope"]:
            n = 2 * t * (hq + hkv) * d
            out.append(Case("rope", f"T={t} {model} {hq}/{hkv}x{d}", [((t, hq, d), 1.0), ((t, hkv, d), 1.0)], (n, n),
                            rope_dim=d))
        for i in sizes["intermediate"]:
            out.append(Case("swiglu", f"T={t} I={i}", [((t, 2 * i), 2.0)], (3 * t * i, 5 * t * i)))
        for i in sizes["bloom_mlp"]:
            out.append(Case("gelu", f"T={t} 4H={i}", [((t, i), 2.0)], (2 * t * i, 3 * t * i)))
    return out


def _rms_norm_residual_reference(x, r, w):
    s = x + r
    return rms_norm_reference(s, w, EPS), s


OURS = {
    "rms_norm": lambda x, w: rms_norm(x, w, EPS),
    "rms_norm_residual": lambda x, r, w: rms_norm(x, w, EPS, residual=r),
    "layer_norm": lambda x, w, b: layer_norm(x, w, b, 1e-5),
    "rope": lambda q, k, pos, cos, sin: rope(q, k, pos, THETA),
    "swiglu": swiglu,
    "gelu": gelu,
}
EAGER = {
    "rms_norm": lambda x, w: rms_norm_reference(x, w, EPS),
    "rms_norm_residual": _rms_norm_residual_reference,
    "layer_norm": lambda x, w, b: layer_norm_reference(x, w, b, 1e-5),
    "rope": lambda q, k, pos, cos, sin: rope_reference(q, k, pos, THETA),
    "swiglu": swiglu_reference,
    "gelu": gelu_reference,
}


def _liger_ops() -> dict[str, Callable]:
    liger = lambda module, name: common.optional(f"liger_kernel.ops.{module}", name)  # noqa: E731
    ops = {}
    if (rms := liger("rms_norm", "LigerRMSNormFunction")) is not None:
        ops["rms_norm"] = lambda x, w: rms.apply(x, w, EPS, 0.0, "llama", False)
    if (add_rms := liger("fused_add_rms_norm", "LigerFusedAddRMSNormFunction")) is not None:
        ops["rms_norm_residual"] = lambda x, r, w: add_rms.apply(x, r, w, EPS, 0.0, "llama", False)
    if (ln := liger("layer_norm", "LigerLayerNormFunction")) is not None:
        ops["layer_norm"] = lambda x, w, b: ln.apply(x, w, b, 1e-5)
    if (rope_fn := liger("rope", "LigerRopeFunction")) is not None:
        # Liger wants [1, heads, T, D] views of [T, heads, D] storage and rotates in place.
        ops["rope"] = lambda q, k, pos, cos, sin: rope_fn.apply(q[None].transpose(1, 2), k[None].transpose(1, 2),
                                                                cos, sin)[:2]
    if (silu_mul := liger("swiglu", "LigerSiLUMulFunction")) is not None:
        ops["swiglu"] = lambda gate_up: silu_mul.apply(*gate_up.chunk(2, dim=-1))
    return ops


def implementations(compile_peers: bool = True) -> dict[str, dict[str, Callable]]:
    """op -> implementation name -> callable on a Case's inputs. `compile_peers=False` leaves
    torch.compile out (--dry-run: compiling on the CPU takes minutes and measures nothing)."""
    liger = _liger_ops()
    impls = {}
    for op, ours in OURS.items():
        impls[op] = {"ours": ours, "torch_eager": EAGER[op]}
        if compile_peers:
            impls[op]["torch_compile"] = torch.compile(EAGER[op], dynamic=True)
        if op in liger:
            impls[op]["liger"] = liger[op]
    return impls


def _outputs(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def forward_backward(impl, inputs) -> tuple:
    """Outputs and input gradients of one call, each output's gradient all ones."""
    outs = _outputs(impl(*inputs))
    leaves = [x for x in inputs if x.requires_grad]
    return (*outs, *torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs]))


def mode_fn(impl, inputs, mode: str) -> Callable[[], object]:
    """A closure running one mode; gradients come from torch.autograd.grad (nothing accumulates)."""
    leaves = [x for x in inputs if x.requires_grad]
    if mode == "forward":
        return lambda: impl(*inputs)
    if mode == "full":
        return lambda: forward_backward(impl, inputs)
    outs = _outputs(impl(*inputs))
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)


def measure(impl, case: Case, mode: str, timer: common.Timer) -> dict:
    """Median ms, GB/s over the minimum traffic and peak MiB allocated above the inputs."""
    inputs = case.make(torch.bfloat16, timer.device)
    ms, peak = common.median_ms_and_peak(mode_fn(impl, inputs, mode), timer)
    elems = {"forward": case.traffic[0], "backward": case.traffic[1], "full": sum(case.traffic)}[mode]
    return {"ms": round(ms, 4), "GBps": round(2 * elems / ms / 1e6, 1), "peak_mib": round(peak / common.MiB, 1)}


def check_correctness(impls, all_cases: list[Case], device) -> dict:
    """Largest relative error of ours vs the eager reference (fp32, first shape of each op) over
    every output and input gradient."""
    errors = {}
    for case in all_cases:
        if case.op in errors:
            continue
        torch.manual_seed(0)
        inputs = case.make(torch.float32, device)
        ours, eager = (forward_backward(impls[case.op][name], inputs) for name in ("ours", "torch_eager"))
        errors[case.op] = max(common.rel_err(a, b) for a, b in zip(ours, eager))
    return errors


def run(quick: bool, timer: common.Timer, dry_run: bool, save) -> tuple[dict, list[dict]]:
    """Every case with ours and the eager peers first, then torch.compile's (a cold compile takes
    seconds per op), so a time limit cuts the least valuable rows; save(check, rows) after each case."""
    impls, all_cases = implementations(compile_peers=not dry_run), cases(quick, dry_run)
    check = check_correctness(impls, all_cases, timer.device)
    print("correctness (max relative error vs fp32 reference):", check, flush=True)
    rows = []
    for compiled in (False, True):
        for case in all_cases:
            for name, impl in impls[case.op].items():
                if (name == "torch_compile") != compiled:
                    continue
                for mode in MODES:
                    row = {"op": case.op, "shape": case.shape, "impl": name, "mode": mode,
                           **common.guarded(lambda: measure(impl, case, mode, timer), strict=dry_run)}
                    rows.append(row)
                    print(row, flush=True)
            save(check, rows)
    return check, rows


def markdown(device, check: dict, rows: list[dict]) -> str:
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["shape"], r["impl"]), {})[r["mode"]] = r
    cell = lambda m, mode, key: m.get(mode, {}).get(key, m.get(mode, {}).get("status", "").split(":")[0])  # noqa: E731
    body = [[op, shape, impl, cell(m, "forward", "ms"), cell(m, "backward", "ms"), cell(m, "full", "ms"),
             cell(m, "full", "GBps"), cell(m, "full", "peak_mib")] for (op, shape, impl), m in by_key.items()]
    lines = [f"# Row and elementwise kernels on {common.device_name(device)}", "",
             f"bf16. Correctness (max relative error of ours vs the fp32 reference): {check}", "",
             "ms = median; GB/s over the minimum traffic; peak = MiB allocated above the inputs.", "",
             *common.table(["op", "shape", "impl", "fwd ms", "bwd ms", "full ms", "full GB/s", "full peak MiB"], body,
                           "lllrrrrr")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args, device, timer = common.start(common.parser(__doc__, quick="T=8K and one shape per op"), argv,
                                       needs_cuda=True, warmup=5, reps=20)
    started = time.time()

    def save(check, rows):
        result = {"meta": common.meta(device), "correctness": check, "rows": rows,
                  "seconds": round(time.time() - started, 1)}
        return common.write_results(args.out, common.stem("kernels", common.device_name(device)), result,
                                    markdown(device, check, rows))
    with backend("triton"):                      # ours is the Triton kernel (interpreted under --dry-run)
        check, rows = run(args.quick, timer, args.dry_run, save)
    print(f"wrote {save(check, rows)}.json/.md in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
