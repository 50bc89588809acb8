"""GPU benchmark: fused linear cross-entropy and the fused AdamW step against their peers.

    python bench/bench_loss_optim.py --out bench/results [--quick]

Loss (bf16 hidden [T, H] and weight [V, H], forward + backward, median ms and peak memory
above the inputs): ours at two logits budgets, torch eager (logits materialized: bf16 matmul,
fp32 cross-entropy) where they fit, torch.compile of that same eager loss (one dynamic-shape
compile; the module's reference upcasts to fp32 before the matmul, an fp32 GEMM no one would
train with), and Liger-Kernel's
LigerFusedLinearCrossEntropyFunction when importable. Shapes: T in {8K, 32K, 64K} over the
(H, V) of Qwen2-0.5B, Qwen2-1.5B and BLOOM-1b7 (--quick: 8K only). A correctness check of our
path against the fp32 reference runs first.
AdamW (one flat buffer of 0.5B and 1.5B parameters): ours with bf16 grads writing bf16
params, ours with fp32 grads and no param copy, torch.optim.AdamW(fused=True) and foreach on
fp32 params and grads. Writes loss_optim_<gpu>.json and .md under --out. ~1-2 min on an H100.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.adamw import adamw_step  # noqa: E402
from kernels.linear_cross_entropy import LOGITS_BUDGET_BYTES, chunk_plan, linear_cross_entropy  # noqa: E402

LOSS_MODELS = {"qwen2-0.5b": (896, 151936), "qwen2-1.5b": (1536, 151936), "bloom-1b7": (2048, 250880)}
TOKENS = (8192, 32768, 65536)
ADAMW_SIZES = {"0.5B": 494_000_000, "1.5B": 1_544_000_000}
HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
MiB = 1 << 20


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(fn, reps: int) -> dict:
    """Median ms of fn() and the peak memory it allocates above what was live before (MiB)."""
    try:
        fn()  # warm-up outside the memory window: compilation, lazy optimizer state
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = median_ms(fn, reps, warmup=0)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "OOM"}
    return {"ms": round(ms, 3), "peak_mib": round((torch.cuda.max_memory_allocated() - base) / MiB, 1)}


def liger_loss():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None

    def loss(h, w, y):
        out = LigerFusedLinearCrossEntropyFunction.apply(h, w, y)
        return out[0] if isinstance(out, tuple) else out
    return loss


def eager_loss(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y)


def loss_impls() -> dict:
    impls = {
        "ours": lambda h, w, y: linear_cross_entropy(h, w, y),
        "ours_1.5GiB": lambda h, w, y: linear_cross_entropy(h, w, y, budget_bytes=1536 * MiB),
        "torch_eager": eager_loss,
        "torch_compile": torch.compile(eager_loss, dynamic=True),
    }
    liger = liger_loss()
    if liger is not None:
        impls["liger"] = liger
    return impls


def loss_inputs(T, H, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) * H ** -0.5).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    y[::10] = -100
    return h, w, y


def fwd_bwd(impl, h, w, y):
    def run():
        impl(h, w, y).backward()
        h.grad = w.grad = None  # freed inside the timed call, so the peak counts them once
    return run


def fits_unfused(T, V, bytes_per_logit):
    """Whether an implementation holding bytes_per_logit per logit leaves 10% of free memory."""
    return T * V * bytes_per_logit < 0.9 * torch.cuda.mem_get_info()[0]


def check_correctness() -> dict:
    """Our loss and grads vs the fp32 reference at T=1000, several chunks (exercises cuBLAS out_dtype paths)."""
    T, (H, V) = 1000, LOSS_MODELS["qwen2-0.5b"]
    h, w, y = loss_inputs(T, H, V, seed=1)
    linear_cross_entropy(h, w, y, budget_bytes=256 * 4 * V).backward()
    ours = (h.grad.float(), w.grad.float())
    h.grad = w.grad = None
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = F.cross_entropy(hr @ wr.t(), y)
    ref.backward()
    loss = linear_cross_entropy(h.detach(), w.detach(), y)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"loss_abs_err": abs(loss.item() - ref.item()), "grad_hidden_rel_err": rel(ours[0], hr.grad),
            "grad_weight_rel_err": rel(ours[1], wr.grad)}


def bench_loss(quick: bool) -> list[dict]:
    rows, impls = [], loss_impls()
    for model, (H, V) in LOSS_MODELS.items():
        for T in TOKENS[:1] if quick else TOKENS:
            h, w, y = loss_inputs(T, H, V)
            flops = 6 * T * H * V
            plan = chunk_plan(T, H, V, torch.bfloat16)
            for name, impl in impls.items():
                row = {"model": model, "T": T, "H": H, "V": V, "impl": name}
                unfused = {"torch_eager": 16, "torch_compile": 12}.get(name)
                if unfused and not fits_unfused(T, V, unfused):
                    row["status"] = f"skipped: needs ~{T * V * unfused / 1e9:.0f} GB"
                else:
                    reps = 3 if flops > 5e13 else 5
                    row.update(measure(fwd_bwd(impl, h, w, y), reps))
                if "ms" in row:
                    row["tflops"] = round(flops / row["ms"] / 1e9, 1)
                if name == "ours":
                    row["planned_peak_mib"] = round(plan.peak_extra_bytes / MiB, 1)
                    row["chunk_tokens"] = plan.chunk_tokens
                rows.append(row)
                print(row, flush=True)
            del h, w, y
    return rows


def bench_adamw(quick: bool) -> list[dict]:
    rows = []
    for label, n in list(ADAMW_SIZES.items())[:1] if quick else ADAMW_SIZES.items():
        for name in ("ours_bf16", "ours_fp32", "torch_fused", "torch_foreach"):
            row = {"params": label, "n": n, "impl": name}
            row.update(measure(adamw_case(name, n), reps=5))
            if "ms" in row:
                row["GBps"] = round(n * 28 / row["ms"] / 1e6, 1)  # g, p, m, v in; p, m, v (+ bf16 p) out
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
    return rows


def adamw_case(name: str, n: int):
    """A closure running one step of `name` on fresh flat buffers of n elements (kept alive by it)."""
    master = torch.randn(n, device="cuda")
    if name.startswith("ours"):
        m, v = torch.zeros_like(master), torch.zeros_like(master)
        grad = torch.randn(n, device="cuda", dtype=torch.bfloat16 if name == "ours_bf16" else torch.float32)
        param = torch.empty(n, device="cuda", dtype=torch.bfloat16) if name == "ours_bf16" else None
        state = {"step": 0}

        def step():
            state["step"] += 1
            adamw_step([master], [grad], [m], [v], None if param is None else [param], step=state["step"], **HYPER)
        return step
    p = torch.nn.Parameter(master)
    p.grad = torch.randn_like(master)
    opt = torch.optim.AdamW([p], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], **{name.split("_")[1]: True})
    return opt.step


def markdown(device: str, check: dict, loss_rows: list[dict], adamw_rows: list[dict]) -> str:
    lines = [f"# Fused loss and AdamW on {device}", "",
             f"Correctness (ours vs fp32 reference, T=1000, Qwen2-0.5B head): {check}", "",
             f"Loss: forward + backward, bf16, 10% of labels ignored; ours default logits budget "
             f"{LOGITS_BUDGET_BYTES // MiB} MiB. Peak = memory above the inputs, gradients included.", "",
             "| model | T | impl | ms | TFLOP/s | peak MiB | planned MiB | status |", "|---|---|---|---|---|---|---|---|"]
    for r in loss_rows:
        lines.append(f"| {r['model']} | {r['T']} | {r['impl']} | {r.get('ms', '')} | {r.get('tflops', '')} | "
                     f"{r.get('peak_mib', '')} | {r.get('planned_peak_mib', '')} | {r.get('status', 'ok')} |")
    lines += ["", "AdamW: one step over one flat buffer; GB/s counts the minimum traffic.", "",
              "| params | impl | ms | GB/s | peak MiB | status |", "|---|---|---|---|---|---|"]
    for r in adamw_rows:
        lines.append(f"| {r['params']} | {r['impl']} | {r.get('ms', '')} | {r.get('GBps', '')} | "
                     f"{r.get('peak_mib', '')} | {r.get('status', 'ok')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="T=8K and the 0.5B AdamW only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_loss_optim needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    started = time.time()
    check = check_correctness()
    print("correctness", check, flush=True)
    loss_rows = bench_loss(args.quick)
    adamw_rows = bench_adamw(args.quick)
    result = {"device": device, "torch": torch.__version__, "correctness": check, "loss": loss_rows,
              "adamw": adamw_rows, "seconds": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"loss_optim_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(device, check, loss_rows, adamw_rows))
    print(f"wrote {stem}.json/.md in {result['seconds']} s")


if __name__ == "__main__":
    main()
