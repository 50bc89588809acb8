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
fp32 params and grads. Writes loss_optim-<gpu>.json and .md under --out. ~1-2 min on an H100;
--dry-run: a tiny head (fp32) and a 4K-element AdamW on the CPU under the Triton interpreter.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402  (first: it sets the interpreter up for --dry-run)
from kernels.adamw import adamw_step  # noqa: E402
from kernels.dispatch import backend  # noqa: E402
from kernels.linear_cross_entropy import (LOGITS_BUDGET_BYTES, chunk_plan, linear_cross_entropy,  # noqa: E402
                                         linear_cross_entropy_reference)
from models import REGISTRY, ModelConfig  # noqa: E402

LOSS_MODELS = ("qwen2-0.5b", "qwen2-1.5b", "bloom-1b7")   # (H, V) = (896, 151936), (1536, 151936), (2048, 250880)
TOKENS = (8192, 32768, 65536)
ADAMW_SIZES = {"0.5B": 494_000_000, "1.5B": 1_544_000_000}
DRY = {"models": ("tiny-qwen2",), "tokens": (40,), "adamw": {"4K": 4096}}
HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
MiB = common.MiB


def head_shape(model: str) -> tuple[int, int]:
    """(hidden, vocab) of the model's output layer, from the registry."""
    c = ModelConfig.from_dict(REGISTRY[model].config, model)
    return c.hidden_size, c.vocab_size


def measure(fn, timer: common.Timer) -> dict:
    ms, peak = common.median_ms_and_peak(fn, timer)
    return {"ms": round(ms, 3), "peak_mib": round(peak / MiB, 1)}


def eager_loss(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y)


def loss_impls(compile_peers: bool = True) -> dict:
    """`compile_peers=False` leaves torch.compile out (--dry-run: minutes of compiling on the CPU)."""
    impls = {
        "ours": linear_cross_entropy,
        "ours_1.5GiB": lambda h, w, y: linear_cross_entropy(h, w, y, budget_bytes=1536 * MiB),
        "torch_eager": eager_loss,
    }
    liger = common.optional("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    if liger is not None:
        def liger_loss(h, w, y):
            out = liger.apply(h, w, y)
            return out[0] if isinstance(out, tuple) else out
        impls["liger"] = liger_loss
    if compile_peers:                            # last: a cold compile is the slowest row
        impls["torch_compile"] = torch.compile(eager_loss, dynamic=True)
    return impls


def loss_inputs(T, H, V, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(T, H, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device, generator=g) * H ** -0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), device=device, generator=g)
    y[::10] = -100
    return h, w, y


def fwd_bwd(impl, h, w, y):
    def run():
        impl(h, w, y).backward()
        h.grad = w.grad = None  # freed inside the timed call, so the peak counts them once
    return run


def fits_unfused(T, V, bytes_per_logit, device):
    """Whether an implementation holding bytes_per_logit per logit leaves 10% of free memory."""
    return device.type != "cuda" or T * V * bytes_per_logit < 0.9 * torch.cuda.mem_get_info(device)[0]


def check_correctness(model: str, T: int, device, dtype) -> dict:
    """Our loss and grads vs the fp32 reference, several chunks (exercises cuBLAS out_dtype paths)."""
    H, V = head_shape(model)
    h, w, y = loss_inputs(T, H, V, device, dtype, seed=1)
    linear_cross_entropy(h, w, y, budget_bytes=max(T // 4, 1) * dtype.itemsize * V).backward()   # ~4 chunks
    ours = (h.grad, w.grad)
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = linear_cross_entropy_reference(hr, wr, y)
    ref.backward()
    loss = linear_cross_entropy(h.detach(), w.detach(), y)
    return {"loss_abs_err": abs(loss.item() - ref.item()), "grad_hidden_rel_err": common.rel_err(ours[0], hr.grad),
            "grad_weight_rel_err": common.rel_err(ours[1], wr.grad)}


def bench_loss(models, tokens, timer: common.Timer, dtype, strict: bool, save) -> list[dict]:
    """save(rows) after each shape."""
    rows, impls, device = [], loss_impls(compile_peers=not strict), timer.device
    for model in models:
        H, V = head_shape(model)
        for T in tokens:
            h, w, y = loss_inputs(T, H, V, device, dtype)
            flops = 6 * T * H * V
            plan = chunk_plan(T, H, V, dtype)
            for name, impl in impls.items():
                row = {"model": model, "T": T, "H": H, "V": V, "impl": name}
                unfused = {"torch_eager": 16, "torch_compile": 12}.get(name)
                if unfused and not fits_unfused(T, V, unfused, device):
                    row["status"] = f"skipped: needs ~{T * V * unfused / 1e9:.0f} GB"
                else:
                    row.update(common.guarded(lambda: measure(fwd_bwd(impl, h, w, y), timer), strict))
                if "ms" in row:
                    row["tflops"] = round(flops / row["ms"] / 1e9, 1)
                if name == "ours":
                    row["planned_peak_mib"] = round(plan.peak_extra_bytes / MiB, 1)
                    row["chunk_tokens"] = plan.chunk_tokens
                rows.append(row)
                print(row, flush=True)
            save(rows)
            h = w = y = None           # freed before the next shape's inputs
    return rows


def bench_adamw(sizes: dict, timer: common.Timer, strict: bool) -> list[dict]:
    rows = []
    for label, n in sizes.items():
        for name in ("ours_bf16", "ours_fp32", "torch_fused", "torch_foreach"):
            if name == "torch_fused" and timer.device.type != "cuda":
                continue
            row = {"params": label, "n": n, "impl": name,
                   **common.guarded(lambda: measure(adamw_case(name, n, timer.device), timer), strict)}
            if "ms" in row:
                row["GBps"] = round(n * 28 / row["ms"] / 1e6, 1)  # g, p, m, v in; p, m, v (+ bf16 p) out
            rows.append(row)
            print(row, flush=True)
            common.free(timer.device)
    return rows


def adamw_case(name: str, n: int, device):
    """A closure running one step of `name` on fresh flat buffers of n elements (kept alive by it)."""
    master = torch.randn(n, device=device)
    if name.startswith("ours"):
        m, v = torch.zeros_like(master), torch.zeros_like(master)
        grad = torch.randn(n, device=device, dtype=torch.bfloat16 if name == "ours_bf16" else torch.float32)
        param = torch.empty(n, device=device, dtype=torch.bfloat16) if name == "ours_bf16" else None
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


def markdown(device, check: dict, loss_rows: list[dict], adamw_rows: list[dict]) -> str:
    loss = [[r["model"], r["T"], r["impl"], r.get("ms", ""), r.get("tflops", ""), r.get("peak_mib", ""),
             r.get("planned_peak_mib", ""), r.get("status", "ok")] for r in loss_rows]
    adamw = [[r["params"], r["impl"], r.get("ms", ""), r.get("GBps", ""), r.get("peak_mib", ""), r.get("status", "ok")]
             for r in adamw_rows]
    lines = [f"# Fused loss and AdamW on {common.device_name(device)}", "",
             f"Correctness (ours vs fp32 reference, T=1000, Qwen2-0.5B head): {check}", "",
             f"Loss: forward + backward, bf16, 10% of labels ignored; ours default logits budget "
             f"{LOGITS_BUDGET_BYTES // MiB} MiB. Peak = memory above the inputs, gradients included.", "",
             *common.table(["model", "T", "impl", "ms", "TFLOP/s", "peak MiB", "planned MiB", "status"], loss,
                           "lrlrrrrl"),
             "", "AdamW: one step over one flat buffer; GB/s counts the minimum traffic.", "",
             *common.table(["params", "impl", "ms", "GB/s", "peak MiB", "status"], adamw, "llrrrl")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args, device, timer = common.start(common.parser(__doc__, quick="T=8K and the 0.5B AdamW only"), argv,
                                       needs_cuda=True, warmup=1, reps=5)
    if args.dry_run:
        models, tokens, sizes, dtype = DRY["models"], DRY["tokens"], DRY["adamw"], torch.float32
    else:
        n = 1 if args.quick else None
        models, tokens, sizes, dtype = LOSS_MODELS, TOKENS[:n], dict(list(ADAMW_SIZES.items())[:n]), torch.bfloat16
    started = time.time()

    def save(loss_rows, adamw_rows):
        result = {"meta": common.meta(device), "correctness": check, "loss": loss_rows, "adamw": adamw_rows,
                  "seconds": round(time.time() - started, 1)}
        return common.write_results(args.out, common.stem("loss_optim", common.device_name(device)), result,
                                    markdown(device, check, loss_rows, adamw_rows))
    with backend("triton"):                      # ours is the Triton kernel (interpreted under --dry-run)
        check = check_correctness(models[0], DRY["tokens"][0] if args.dry_run else 1000, device, dtype)
        print("correctness", check, flush=True)
        adamw_rows = bench_adamw(sizes, timer, args.dry_run)    # first: seconds, where the loss takes a minute
        loss_rows = bench_loss(models, tokens, timer, dtype, args.dry_run, lambda rows: save(rows, adamw_rows))
    print(f"wrote {save(loss_rows, adamw_rows)}.json/.md in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
