"""GPU benchmark: the row and elementwise kernels (rms_norm, its fused residual add, layer_norm,
rope, swiglu, gelu) against their peers.

    python bench/bench_kernels.py --out bench/results [--quick]

For each op at real shapes (bf16, T tokens in {8K, 64K}; hidden 896/1024/1536/2048, the Qwen2
head layouts 14/2x64, 16/16x64, 12/2x128, intermediate 4864/8960/2816, BLOOM's 4H), each
implementation is timed in three modes: forward (with autograd recording, as in training),
backward (torch.autograd.grad through a kept graph) and full (both): median ms by
triton.testing.do_bench, GB/s over the minimum bf16 traffic, and peak memory allocated above
the inputs. Implementations: ours (Triton), torch eager (the module's reference), torch.compile
of that reference (dynamic shapes, one compile per op) and Liger-Kernel's ops when importable
(no plain GELU there). A correctness check of ours against the reference in fp32 runs first.
Writes kernels_<gpu>.json and .md under --out. About 1-2 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.gelu import gelu, gelu_reference  # noqa: E402
from kernels.layer_norm import layer_norm, layer_norm_reference  # noqa: E402
from kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from kernels.rope import rope, rope_cos_sin, rope_reference  # noqa: E402
from kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

TOKENS = (8192, 65536)
HIDDEN = (896, 1024, 1536, 2048)
ROPE_HEADS = {"qwen2-0.5b": (14, 2, 64), "qwen1.5-0.5b": (16, 16, 64), "qwen2-1.5b": (12, 2, 128)}
INTERMEDIATE = (4864, 8960, 2816)
BLOOM_MLP = (4096, 6144, 8192)
MODES = ("forward", "backward", "full")
EPS, THETA, SEQ_LEN = 1e-6, 1e6, 512  # rope positions restart every SEQ_LEN tokens (packed batch)
MiB = 1 << 20


@dataclass
class Case:
    """One op at one shape: `make(dtype)` builds fresh CUDA inputs (the float ones require grad);
    traffic: tensor elements the forward and the backward must at least read plus write."""
    op: str
    shape: str
    make: Callable[[torch.dtype], tuple]
    traffic: tuple[int, int]


def _randn(*shape, dtype, grad=True, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda")).to(dtype).requires_grad_(grad)


def _positions(t):
    return torch.arange(t, device="cuda") % SEQ_LEN


def cases(quick: bool) -> list[Case]:
    tokens = TOKENS[:1] if quick else TOKENS
    out = []
    for t in tokens:
        for h in HIDDEN[:1] if quick else HIDDEN:
            norm_in = lambda dt, t=t, h=h: (_randn(t, h, dtype=dt), _randn(h, dtype=dt))  # noqa: E731
            out.append(Case("rms_norm", f"T={t} H={h}", norm_in, (2 * t * h, 3 * t * h)))
            out.append(Case("rms_norm_residual", f"T={t} H={h}",
                            lambda dt, t=t, h=h: (_randn(t, h, dtype=dt), _randn(t, h, dtype=dt), _randn(h, dtype=dt)),
                            (4 * t * h, 4 * t * h)))
            out.append(Case("layer_norm", f"T={t} H={h}",
                            lambda dt, t=t, h=h: (*norm_in(dt, t, h), _randn(h, dtype=dt, scale=0.1)),
                            (2 * t * h, 3 * t * h)))
        for model, (hq, hkv, d) in list(ROPE_HEADS.items())[:1] if quick else ROPE_HEADS.items():
            def rope_in(dt, t=t, hq=hq, hkv=hkv, d=d):
                cos, sin = rope_cos_sin(_positions(t), d, THETA)  # for Liger, made once per step as in HF
                return _randn(t, hq, d, dtype=dt), _randn(t, hkv, d, dtype=dt), _positions(t), cos[None], sin[None]
            n = 2 * t * (hq + hkv) * d
            out.append(Case("rope", f"T={t} {model} {hq}/{hkv}x{d}", rope_in, (n, n)))
        for i in INTERMEDIATE[:1] if quick else INTERMEDIATE:
            out.append(Case("swiglu", f"T={t} I={i}",
                            lambda dt, t=t, i=i: (_randn(t, i, dtype=dt, scale=2.0), _randn(t, i, dtype=dt)),
                            (3 * t * i, 5 * t * i)))
        for i in BLOOM_MLP[:1] if quick else BLOOM_MLP:
            out.append(Case("gelu", f"T={t} 4H={i}", lambda dt, t=t, i=i: (_randn(t, i, dtype=dt, scale=2.0),),
                            (2 * t * i, 3 * t * i)))
    return out


def _liger(module: str, name: str):
    try:
        return getattr(__import__(f"liger_kernel.ops.{module}", fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def _eager_ops() -> dict[str, Callable]:
    def rms_residual(x, r, w):
        s = x + r
        return rms_norm_reference(s, w, EPS), s

    return {
        "rms_norm": lambda x, w: rms_norm_reference(x, w, EPS),
        "rms_norm_residual": rms_residual,
        "layer_norm": lambda x, w, b: layer_norm_reference(x, w, b, 1e-5),
        "rope": lambda q, k, pos, cos, sin: rope_reference(q, k, pos, THETA),
        "swiglu": swiglu_reference,
        "gelu": gelu_reference,
    }


def _liger_ops() -> dict[str, Callable]:
    ops = {}
    if (rms := _liger("rms_norm", "LigerRMSNormFunction")) is not None:
        ops["rms_norm"] = lambda x, w: rms.apply(x, w, EPS, 0.0, "llama", False)
    if (add_rms := _liger("fused_add_rms_norm", "LigerFusedAddRMSNormFunction")) is not None:
        ops["rms_norm_residual"] = lambda x, r, w: add_rms.apply(x, r, w, EPS, 0.0, "llama", False)
    if (ln := _liger("layer_norm", "LigerLayerNormFunction")) is not None:
        ops["layer_norm"] = lambda x, w, b: ln.apply(x, w, b, 1e-5)
    if (rope_fn := _liger("rope", "LigerRopeFunction")) is not None:
        # Liger wants [1, heads, T, D] views of [T, heads, D] storage and rotates in place.
        ops["rope"] = lambda q, k, pos, cos, sin: rope_fn.apply(q[None].transpose(1, 2), k[None].transpose(1, 2),
                                                                cos, sin)[:2]
    if (silu_mul := _liger("swiglu", "LigerSiLUMulFunction")) is not None:
        ops["swiglu"] = silu_mul.apply
    return ops


def implementations() -> dict[str, dict[str, Callable]]:
    """op -> implementation name -> callable on a Case's inputs."""
    ours = {
        "rms_norm": lambda x, w: rms_norm(x, w, EPS),
        "rms_norm_residual": lambda x, r, w: rms_norm(x, w, EPS, residual=r),
        "layer_norm": lambda x, w, b: layer_norm(x, w, b, 1e-5),
        "rope": lambda q, k, pos, cos, sin: rope(q, k, pos, THETA),
        "swiglu": swiglu,
        "gelu": gelu,
    }
    eager, liger = _eager_ops(), _liger_ops()
    impls = {}
    for op in ours:
        impls[op] = {"ours": ours[op], "torch_eager": eager[op], "torch_compile": torch.compile(eager[op], dynamic=True)}
        if op in liger:
            impls[op]["liger"] = liger[op]
    return impls


def _outputs(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def mode_fn(impl, inputs, mode: str) -> Callable[[], object]:
    """A closure running one mode; gradients come from torch.autograd.grad (nothing accumulates)."""
    leaves = [x for x in inputs if x.requires_grad]
    if mode == "forward":
        return lambda: impl(*inputs)
    if mode == "full":
        def full():
            outs = _outputs(impl(*inputs))
            return torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
        return full
    outs = _outputs(impl(*inputs))
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)


def measure(impl, case: Case, mode: str) -> dict:
    """Median ms, GB/s over the minimum traffic and peak MiB allocated above the inputs."""
    try:
        inputs = case.make(torch.bfloat16)
        fn = mode_fn(impl, inputs, mode)
        fn()  # compile / autotune outside the memory window
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / MiB
        ms = triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "OOM"}
    except Exception as e:  # a peer's failure (e.g. another Liger version) must not lose the whole run
        return {"status": f"error: {type(e).__name__}: {e}"[:200]}
    elems = {"forward": case.traffic[0], "backward": case.traffic[1], "full": sum(case.traffic)}[mode]
    return {"ms": round(ms, 4), "GBps": round(2 * elems / ms / 1e6, 1), "peak_mib": round(peak, 1)}


def check_correctness(impls, all_cases: list[Case]) -> dict:
    """Largest relative error of ours vs the eager reference (fp32, first shape of each op) over
    every output and input gradient."""
    errors = {}
    for case in all_cases:
        if case.op in errors:
            continue
        torch.manual_seed(0)
        inputs = case.make(torch.float32)
        results = []
        for name in ("ours", "torch_eager"):
            outs = _outputs(impls[case.op][name](*inputs))
            leaves = [x for x in inputs if x.requires_grad]
            grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
            results.append([o.float() for o in outs] + [g.float() for g in grads])
        errors[case.op] = max(((a - b).norm() / b.norm()).item() for a, b in zip(*results))
    return errors


def run(quick: bool) -> tuple[dict, list[dict]]:
    impls, all_cases = implementations(), cases(quick)
    check = check_correctness(impls, all_cases)
    print("correctness (max relative error vs fp32 reference):", check, flush=True)
    rows = []
    for case in all_cases:
        for name, impl in impls[case.op].items():
            for mode in MODES:
                row = {"op": case.op, "shape": case.shape, "impl": name, "mode": mode, **measure(impl, case, mode)}
                rows.append(row)
                print(row, flush=True)
    return check, rows


def markdown(device: str, check: dict, rows: list[dict]) -> str:
    lines = [f"# Row and elementwise kernels on {device}", "",
             f"bf16. Correctness (max relative error of ours vs the fp32 reference): {check}", "",
             "ms = do_bench median; GB/s over the minimum traffic; peak = MiB allocated above the inputs.", "",
             "| op | shape | impl | fwd ms | bwd ms | full ms | full GB/s | full peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["shape"], r["impl"]), {})[r["mode"]] = r
    for (op, shape, impl), m in by_key.items():
        cell = lambda mode, key: m.get(mode, {}).get(key, m.get(mode, {}).get("status", "").split(":")[0])  # noqa: E731
        lines.append(f"| {op} | {shape} | {impl} | {cell('forward', 'ms')} | {cell('backward', 'ms')} | "
                     f"{cell('full', 'ms')} | {cell('full', 'GBps')} | {cell('full', 'peak_mib')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="T=8K and one shape per op")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU (torch.cuda.is_available() is False). On the CPU the kernels "
                 "are checked by: python -m pytest tests/test_kernels_norms.py tests/test_kernels_elementwise.py")
    device = torch.cuda.get_device_name()
    started = time.time()
    check, rows = run(args.quick)
    result = {"device": device, "torch": torch.__version__, "correctness": check, "rows": rows,
              "seconds": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(device, check, rows))
    print(f"wrote {stem}.json/.md in {result['seconds']} s")


if __name__ == "__main__":
    main()
