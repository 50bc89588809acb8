"""Attention throughput on one GPU: varlen training attention and KV-cache decode attention.

    python bench/bench_attention.py --out bench/results

Training attention, at the models' real shapes (Qwen2-0.5B 14/2 d64, Qwen2-1.5B 12/2 d128,
Qwen1.5-0.5B 16/16 d64, BLOOM 16 heads d64 with ALiBi), bf16, packed batches of 16K and 64K
tokens made of poem-like sequences of 100-250 tokens:
  ours        kernels.attention.triton_attention (the Triton kernels, even when flash-attn exists)
  flash-attn  flash_attn_varlen_func, when importable
  sdpa        torch SDPA on the batch padded to [B, H, L_max, D] (flash backend, causal; memory-
              efficient backend with a [1, H, L, L] ALiBi+causal bias for BLOOM), KV heads already
              expanded to the query heads. Padding, unpadding and the expansion are not timed: this
              is the fastest fair torch baseline (per-sequence SDPA calls are launch-bound, a
              block-diagonal mask over the packed stream is quadratic in T).
FLOPs count only the causal triangle actually needed: forward 4 * D * Hq * sum_b L_b (L_b + 1) / 2
(QK^T and PV), backward 2.5x that (five matmuls instead of two). Backward time = time(forward +
backward) - time(forward). Every implementation is checked against ours before it is timed.

Decode attention: bf16 caches [slots, Hkv, 512, D], batch 64-512, cache lengths 20-80% of 512, one query
per sequence; achieved GB/s = bytes of K and V rows read (+ q and out) / time, for our kernel
with the automatic split rule and with split-K off, and for the torch reference.

Writes attention-<device>.json and .md under --out (bench/common.py: arguments, timing, output).
About a minute on an H100; --dry-run: a smoke test on the CPU under the Triton interpreter.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402  (first: it sets the interpreter up for --dry-run)
from kernels.attention import cu_seqlens, flash_attn_attention, flash_attn_varlen_func, triton_attention  # noqa: E402
from kernels.decode_attention import decode_attention, decode_attention_reference, decode_num_splits  # noqa: E402
from kernels.dispatch import backend  # noqa: E402
from models import REGISTRY, ModelConfig  # noqa: E402
from models.bloom import alibi_slopes  # noqa: E402

MODELS = ("qwen2-0.5b", "qwen2-1.5b", "qwen1.5-0.5b", "bloom-560m")   # 14/2 d64, 12/2 d128, 16/16 d64, ALiBi
TOKEN_BUDGETS = (16384, 65536)
DECODE_BATCHES = (64, 128, 256, 512)
DECODE_S_MAX = 512
# --dry-run: the tiny presets (GQA; ALiBi), a few sequences, under the interpreter
DRY = {"models": ("tiny-qwen2", "tiny-bloom"), "budgets": (48,), "batches": (3,), "s_max": 128}


def heads(model: str) -> tuple[int, int, int, bool]:
    """(query heads, KV heads, head_dim, ALiBi) from the registry's config."""
    c = ModelConfig.from_dict(REGISTRY[model].config, model)
    return c.num_heads, c.num_kv_heads, c.head_dim, c.model_type == "bloom"


def poem_lengths(budget: int, generator) -> list[int]:
    """Poem-like lengths of 100-250 tokens (shorter for a tiny budget) filling `budget` tokens."""
    hi = min(250, budget // 2)
    lo, lengths = min(100, hi // 2), []
    while sum(lengths) < budget:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - budget
    return [n for n in lengths if n > 0]


# ---------------------------------------------------------------- varlen training attention

def pad(x, lengths):
    """[T, H, D] -> [B, H, L_max, D] (zeros after each sequence's end)."""
    return torch.nn.utils.rnn.pad_sequence(x.split(lengths), batch_first=True).transpose(1, 2).contiguous()


def unpad(x, lengths):
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def sdpa_padded(q, k, v, lengths, l_max, slopes):
    """-> (run, its leaf inputs, out -> packed): padded SDPA on copies of q, k, v [T, H*, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    group = q.shape[1] // k.shape[1]
    qp = pad(q.detach(), lengths).requires_grad_()
    kp = pad(k.detach().repeat_interleave(group, 1), lengths).requires_grad_()
    vp = pad(v.detach().repeat_interleave(group, 1), lengths).requires_grad_()
    if slopes is None:
        backends, bias = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], None
    else:
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
        pos = torch.arange(l_max, device=q.device)
        rel = (pos[None, :] - pos[:, None]).float()
        bias = (slopes[:, None, None] * rel).masked_fill(rel > 0, float("-inf"))[None].to(q.dtype)

    def run():
        with sdpa_kernel(backends, set_priority=True):
            if bias is None:
                return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
            return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias)
    return run, (qp, kp, vp), lambda out: unpad(out, lengths)


def time_fwd_bwd(timer, run, inputs, dout):
    """-> (forward ms, backward ms) of `run()` whose output gets the gradient `dout`."""
    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        for t in inputs:
            t.grad = None
        run().backward(dout)
    forward = timer.median_ms(fwd)
    return {"fwd_ms": forward, "bwd_ms": max(timer.median_ms(fwd_bwd) - forward, 1e-6)}


def bench_training(model, budget, generator, timer, strict):
    n_heads, n_kv, head_dim, alibi = heads(model)
    device, dtype = timer.device, dtype_on(timer.device)
    lengths = poem_lengths(budget, generator)
    n_tokens, l_max = sum(lengths), max(lengths)
    cu = cu_seqlens(lengths, device)
    slopes = alibi_slopes(n_heads).to(device) if alibi else None
    q, k, v = (torch.randn(n_tokens, h, head_dim, device=device, dtype=dtype).requires_grad_()
               for h in (n_heads, n_kv, n_kv))
    dout = torch.randn_like(q)
    flops_fwd = 4 * head_dim * n_heads * sum(n * (n + 1) // 2 for n in lengths)
    rows = []

    def record(impl, measure):
        row = {"kind": "train", "model": model, "tokens": n_tokens, "sequences": len(lengths), "max_seqlen": l_max,
               "impl": impl, **common.guarded(measure, strict)}
        if "fwd_ms" in row:
            row.update(fwd_tflops=flops_fwd / row["fwd_ms"] * 1e-9, bwd_tflops=2.5 * flops_fwd / row["bwd_ms"] * 1e-9)
        rows.append(row)

    def ours():
        return triton_attention(q, k, v, cu, l_max, slopes)
    reference = ours().detach()
    record("ours (triton)", lambda: {**time_fwd_bwd(timer, ours, (q, k, v), dout), "rel_err_vs_ours": 0.0})

    if flash_attn_varlen_func is not None and device.type == "cuda":
        def flash():
            return flash_attn_attention(q, k, v, cu, l_max, slopes)
        record("flash-attn", lambda: {**time_fwd_bwd(timer, flash, (q, k, v), dout),
                                      "rel_err_vs_ours": common.rel_err(flash(), reference)})

    def sdpa():
        run, inputs, to_packed = sdpa_padded(q, k, v, lengths, l_max, slopes)
        return {**time_fwd_bwd(timer, run, inputs, pad(dout, lengths)),
                "rel_err_vs_ours": common.rel_err(to_packed(run()), reference)}
    record("sdpa (padded)", sdpa)
    return rows


# ---------------------------------------------------------------- decode attention

def bench_decode(model, batch, s_max, generator, timer, strict):
    n_heads, n_kv, head_dim, alibi = heads(model)
    device, dtype = timer.device, dtype_on(timer.device)
    lengths = torch.randint(s_max // 5, 4 * s_max // 5, (batch,), generator=generator, dtype=torch.int32).to(device)
    k_cache, v_cache = (torch.randn(batch, n_kv, s_max, head_dim, device=device, dtype=dtype) for _ in range(2))
    slot_ids = torch.randperm(batch, generator=generator).to(device)
    q = torch.randn(batch, n_heads, head_dim, device=device, dtype=dtype)
    slopes = alibi_slopes(n_heads).to(device) if alibi else None
    nbytes = (2 * int(lengths.sum()) * n_kv * head_dim + 2 * q.numel()) * q.element_size()
    reference = decode_attention_reference(q, k_cache, v_cache, lengths, slot_ids, slopes)
    auto_splits = decode_num_splits(batch, n_kv, s_max, 64, q.device)
    impls = {f"ours (splits={auto_splits})": lambda: decode_attention(q, k_cache, v_cache, lengths, slot_ids, slopes),
             "ours (splits=1)": lambda: decode_attention(q, k_cache, v_cache, lengths, slot_ids, slopes, num_splits=1),
             "torch reference": lambda: decode_attention_reference(q, k_cache, v_cache, lengths, slot_ids, slopes)}
    if auto_splits == 1:
        del impls["ours (splits=1)"]
    rows = []
    for impl, fn in impls.items():
        def measure(fn=fn):
            ms = timer.median_ms(fn)
            return {"ms": ms, "gb_per_s": nbytes / ms * 1e-6, "rel_err_vs_reference": common.rel_err(fn(), reference)}
        rows.append({"kind": "decode", "model": model, "batch": batch, "s_max": s_max, "impl": impl,
                     **common.guarded(measure, strict)})
    return rows


# ---------------------------------------------------------------- report

def dtype_on(device) -> torch.dtype:
    """bf16 on the GPU; fp32 under the CPU dry run (torch's CPU SDPA and the interpreter)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cells(row: dict, keys: list[str], fmt: str) -> list[str]:
    return [format(row[k], fmt) if k in row else row.get("status", "") for k in keys]


def markdown(device, rows) -> str:
    train = [[r["model"], r["tokens"], r["sequences"], r["impl"],
              *cells(r, ["fwd_ms", "fwd_tflops", "bwd_ms", "bwd_tflops"], ".3f"), *cells(r, ["rel_err_vs_ours"], ".1e")]
             for r in rows if r["kind"] == "train"]
    decode = [[r["model"], r["batch"], r["impl"], *cells(r, ["ms", "gb_per_s"], ".4f"),
               *cells(r, ["rel_err_vs_reference"], ".1e")] for r in rows if r["kind"] == "decode"]
    hw = common.hardware(device)
    peak = f"; datasheet bf16 peak {hw.peak_bf16_flops / 1e12:.0f} TFLOP/s" if hw else ""
    lines = [f"# Attention on {common.device_name(device)}", "",
             f"TFLOP/s over the causal FLOPs actually needed (backward counted as 2.5x forward){peak}.", "",
             *common.table(["model", "tokens", "seqs", "impl", "fwd ms", "fwd TFLOP/s", "bwd ms", "bwd TFLOP/s",
                            "rel err"], train, "lrrlrrrrr"),
             "", "Decode (one query per sequence, cache lengths 20-80% of S_max):", "",
             *common.table(["model", "batch", "impl", "ms", "GB/s", "rel err"], decode, "lrlrrr")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args, device, timer = common.start(common.parser(__doc__), argv, needs_cuda=True, warmup=10, reps=30)
    models, budgets, batches, s_max = ((DRY["models"], DRY["budgets"], DRY["batches"], DRY["s_max"]) if args.dry_run
                                       else (MODELS, TOKEN_BUDGETS, DECODE_BATCHES, DECODE_S_MAX))
    generator = torch.Generator().manual_seed(0)
    rows = []

    def save():
        return common.write_results(args.out, common.stem("attention", common.device_name(device)),
                                    {"meta": common.meta(device), "rows": rows}, markdown(device, rows))
    with backend("triton"):                      # ours is the Triton kernel (interpreted under --dry-run)
        for model in models:
            for budget in budgets:
                rows += bench_training(model, budget, generator, timer, args.dry_run)
                print(json.dumps(rows[-1]), flush=True)
            save()
        for model in models:
            for batch in batches:
                rows += bench_decode(model, batch, s_max, generator, timer, args.dry_run)
                print(json.dumps(rows[-1]), flush=True)
            save()
    print(markdown(device, rows))
    print(f"wrote {save()}.json/.md")


if __name__ == "__main__":
    main()
