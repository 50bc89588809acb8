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

Decode attention: bf16 caches [slots, Hkv, 512, D], batch 64-512, cache lengths 100-400, one query
per sequence; achieved GB/s = bytes of K and V rows read (+ q and out) / time, for our kernel
with the automatic split rule and with split-K off, and for the torch reference.

Writes attention_<device>.json and attention_<device>.md under --out. About a minute on an H100.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.attention import triton_attention
from kernels.decode_attention import decode_attention, decode_attention_reference, decode_num_splits

MODELS = {  # name: (Hq, Hkv, head_dim, alibi)
    "qwen2-0.5b": (14, 2, 64, False),
    "qwen2-1.5b": (12, 2, 128, False),
    "qwen1.5-0.5b": (16, 16, 64, False),
    "bloom-560m": (16, 16, 64, True),
}
TOKEN_BUDGETS = (16384, 65536)
DECODE_BATCHES = (64, 128, 256, 512)
DECODE_S_MAX = 512


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """BLOOM's slopes (n_heads a power of two here)."""
    base = 2.0 ** (-8.0 / n_heads)
    return torch.tensor([base ** (h + 1) for h in range(n_heads)], dtype=torch.float32)


def poem_lengths(budget: int, generator) -> list[int]:
    lengths = []
    while sum(lengths) < budget:
        lengths.append(int(torch.randint(100, 251, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - budget
    return [n for n in lengths if n > 0]


def bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------
# Varlen training attention
# ---------------------------------------------------------------------------------------------

def pad(x, lengths, l_max):
    """[T, H, D] -> [B, H, L_max, D] (zeros after each sequence's end)."""
    out = x.new_zeros(len(lengths), l_max, *x.shape[1:])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[start:start + n]
        start += n
    return out.transpose(1, 2).contiguous()


def unpad(x, lengths):
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def sdpa_padded(q, k, v, lengths, l_max, slopes):
    """-> (run, its leaf inputs, out -> packed): padded SDPA on copies of q, k, v [T, H*, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    group = q.shape[1] // k.shape[1]
    qp = pad(q.detach(), lengths, l_max).requires_grad_()
    kp = pad(k.detach().repeat_interleave(group, 1), lengths, l_max).requires_grad_()
    vp = pad(v.detach().repeat_interleave(group, 1), lengths, l_max).requires_grad_()
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


def time_fwd_bwd(run, inputs, dout):
    """-> (forward ms, backward ms) of `run()` whose output gets the gradient `dout`."""
    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        for t in inputs:
            t.grad = None
        run().backward(dout)
    forward = bench_ms(fwd)
    return forward, max(bench_ms(fwd_bwd) - forward, 1e-6)


def bench_training(model, budget, generator):
    n_heads, n_kv, head_dim, alibi = MODELS[model]
    lengths = poem_lengths(budget, generator)
    n_tokens, l_max = sum(lengths), max(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    slopes = alibi_slopes(n_heads).cuda() if alibi else None
    q, k, v = (torch.randn(n_tokens, h, head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (n_heads, n_kv, n_kv))
    dout = torch.randn_like(q)
    flops_fwd = 4 * head_dim * n_heads * sum(n * (n + 1) // 2 for n in lengths)
    rows = []

    def record(impl, fwd_ms, bwd_ms, err):
        rows.append({"kind": "train", "model": model, "tokens": n_tokens, "sequences": len(lengths),
                     "max_seqlen": l_max, "impl": impl, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
                     "fwd_tflops": flops_fwd / fwd_ms * 1e-9, "bwd_tflops": 2.5 * flops_fwd / bwd_ms * 1e-9,
                     "rel_err_vs_ours": err})

    def ours():
        return triton_attention(q, k, v, cu, l_max, slopes)
    reference = ours().detach()
    record("ours (triton)", *time_fwd_bwd(ours, (q, k, v), dout), 0.0)

    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        def flash():
            return flash_attn_varlen_func(q, k, v, cu, cu, l_max, l_max, causal=True, alibi_slopes=slopes)
        record("flash-attn", *time_fwd_bwd(flash, (q, k, v), dout), rel_err(flash(), reference))

    run, inputs, to_packed = sdpa_padded(q, k, v, lengths, l_max, slopes)
    dout_padded = pad(dout, lengths, l_max)
    record("sdpa (padded)", *time_fwd_bwd(run, inputs, dout_padded), rel_err(to_packed(run()), reference))
    return rows


# ---------------------------------------------------------------------------------------------
# Decode attention
# ---------------------------------------------------------------------------------------------

def bench_decode(model, batch, generator):
    n_heads, n_kv, head_dim, alibi = MODELS[model]
    lengths = torch.randint(100, 401, (batch,), generator=generator, dtype=torch.int32).cuda()
    cache_shape = (batch, n_kv, DECODE_S_MAX, head_dim)
    k_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16)
    slot_ids = torch.randperm(batch, generator=generator).cuda()
    q = torch.randn(batch, n_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    slopes = alibi_slopes(n_heads).cuda() if alibi else None
    nbytes = (2 * int(lengths.sum()) * n_kv * head_dim + 2 * q.numel()) * q.element_size()
    reference = decode_attention_reference(q, k_cache, v_cache, lengths, slot_ids, slopes)
    auto_splits = decode_num_splits(batch, n_kv, DECODE_S_MAX, 64, q.device)
    impls = {f"ours (splits={auto_splits})": lambda: decode_attention(q, k_cache, v_cache, lengths, slot_ids, slopes),
             "ours (splits=1)": lambda: decode_attention(q, k_cache, v_cache, lengths, slot_ids, slopes, num_splits=1),
             "torch reference": lambda: decode_attention_reference(q, k_cache, v_cache, lengths, slot_ids, slopes)}
    rows = []
    for impl, fn in impls.items():
        if impl == "ours (splits=1)" and auto_splits == 1:
            continue
        err = rel_err(fn(), reference)
        ms = bench_ms(fn)
        rows.append({"kind": "decode", "model": model, "batch": batch, "impl": impl, "ms": ms,
                     "gb_per_s": nbytes / ms * 1e-6, "rel_err_vs_reference": err})
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def markdown(device: str, rows) -> str:
    lines = [f"# Attention on {device}", "",
             "bf16; TFLOP/s over the causal FLOPs actually needed (backward counted as 2.5x forward).", "",
             "| model | tokens | seqs | impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | rel err |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "train":
            lines.append(f"| {r['model']} | {r['tokens']} | {r['sequences']} | {r['impl']} | {r['fwd_ms']:.3f} | "
                         f"{r['fwd_tflops']:.1f} | {r['bwd_ms']:.3f} | {r['bwd_tflops']:.1f} | "
                         f"{r['rel_err_vs_ours']:.1e} |")
    lines += ["", "Decode (one query per sequence, cache lengths 100-400, S_max 512):", "",
              "| model | batch | impl | ms | GB/s | rel err |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "decode":
            lines.append(f"| {r['model']} | {r['batch']} | {r['impl']} | {r['ms']:.4f} | {r['gb_per_s']:.0f} | "
                         f"{r['rel_err_vs_reference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU (the Triton kernels are timed, not interpreted)")
    device = torch.cuda.get_device_name()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for model in MODELS:
        for budget in TOKEN_BUDGETS:
            rows += bench_training(model, budget, generator)
            print(json.dumps(rows[-1]), flush=True)
    for model in MODELS:
        for batch in DECODE_BATCHES:
            rows += bench_decode(model, batch, generator)
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "attention_" + re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    meta = {"device": device, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "peak_bf16_tflops_datasheet": 989}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(device, rows))
    print(markdown(device, rows))


if __name__ == "__main__":
    main()
