"""Greedy decoding throughput: engine.generate vs transformers' batched generate, in one run.

    python bench/bench_generate.py                        # CPU: a Qwen2 of the tiny-qwen2 shape
    python bench/bench_generate.py --models qwen2-0.5b qwen2-1.5b bloom-560m   # GPU: registry shapes, random weights

Both sides run the same weights (ours copied into the transformers model, whose parameter
names are ours), the same prompts (random ids of mixed lengths), greedily, the same
max_new_tokens, in three workloads (transformers in a process of its own: bench/transformers_side.py): no EOS (prompts x max_new_tokens tokens each), an EOS id
the model emits (outputs of varied length), and 'recitation': each prompt has its own cap, the
token length of a real poem target + 16 (as the memorization eval asks), which transformers'
batched generate cannot express, so it runs to the batch's largest cap and the rows are cut;
transformers gets the prompts left-padded with an attention mask, in one batch. The CPU mode uses
one thread on both sides by default: timings with 2 OpenMP threads on a shared machine swing by
10x. Reported: tokens/s of each, the ratio, the share of identical outputs, and for ours the
achieved memory bandwidth: per decode step the weights plus every live sequence's cached keys and
values are read once. Results go to generate-<device>.{json,md} under --out (default runs/bench/).
"""
from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.transformers_side import TransformersSide  # noqa: E402
from engine.generate import greedy_generate  # noqa: E402
from models import REGISTRY, KVCache, load_model  # noqa: E402

CPU_MODEL = "tiny-qwen2"


def cpu_model(directory: Path, side: TransformersSide):
    """A random Qwen2 of the tiny-qwen2 preset's shape, written by transformers (std 0.02 init), loaded by us."""
    side.write_from_config(REGISTRY[CPU_MODEL].config, directory)
    return load_model(directory)


def hf_twin(model, side: TransformersSide) -> None:
    """Our model's weights, saved in the Hugging Face format, made the transformers side's model."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        side.load(tmp, model.device, model.dtype)


def prompts_for(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for length in lengths]


def recitation_caps(n: int, seed: int = 0) -> list[int]:
    """Per-prompt caps of a memorization eval: target tokens (tiny tokenizer) of n CN poems + 16."""
    from engine.data import encode_examples, load_poems
    from models import load_tokenizer
    examples = encode_examples(load_poems("cn", 256, n, seed), load_tokenizer("tiny-qwen2"), "cn", "plain")
    return [len(e.target_ids) + 16 for e in examples]


def common_token(outputs: list[list[int]]) -> int:
    """The token found in the most outputs after their first position: as EOS it ends them at varied steps."""
    counts = Counter(t for row in outputs for t in set(row[1:]))
    return max(counts, key=counts.get)


def bytes_read(model, prompts, outputs, steps: int) -> int:
    """Weights once per decode step + each live sequence's cached keys and values once per step."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = KVCache.bytes_per_token(model.config, model.dtype)
    kv = sum(sum(len(p) + j for j in range(1, len(out) + 1)) for p, out in zip(prompts, outputs)) * per_token
    return steps * weights + kv


def bench_one(name: str, model, side: TransformersSide, prompts, max_new_tokens: int, hf_batch: int,
              max_cap: int | None = None, **generate_kwargs) -> list[dict]:
    """The three workloads' rows (the module's docstring); recitation caps at most `max_cap`."""
    hf_twin(model, side)
    greedy_generate(model, prompts[:4], 4, [], **generate_kwargs)                # warm-up (kernels, graphs)
    rows, eos, timer = [], None, common.Timer(model.device)
    for workload in ("fixed", "eos", "recitation"):
        eos_ids = [eos] if workload == "eos" else []
        caps = recitation_caps(len(prompts)) if workload == "recitation" else [max_new_tokens] * len(prompts)
        caps = [min(c, max_cap or c) for c in caps]
        stats = {}
        ours, ours_s = timer.seconds(lambda: greedy_generate(model, prompts, caps, eos_ids, stats=stats,
                                                             **generate_kwargs))
        hf = side.generate_timed(prompts, max(caps), hf_batch, eos_ids[0] if eos_ids else None)
        theirs, theirs_s = [row[:cap] for row, cap in zip(hf["outputs"], caps)], hf["seconds"][0]
        tokens = stats["generated_tokens"]             # kept tokens + the EOS that ended a sequence
        rows.append({
            "model": name, "workload": workload, "dtype": str(model.dtype).removeprefix("torch."),
            "prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "max_new_tokens": max(caps),
            "generated_tokens": tokens, "hf_batch": hf_batch,
            "ours_tok_s": tokens / ours_s, "transformers_tok_s": tokens / theirs_s, "speedup": theirs_s / ours_s,
            "identical_outputs": sum(a == b for a, b in zip(ours, theirs)) / len(prompts),
            "ours_gb_s": bytes_read(model, prompts, ours, stats["steps"]) / ours_s / 1e9,
            "ours_seconds": ours_s, "transformers_seconds": theirs_s, "batches": stats["batches"],
            "steps": stats["steps"]})
        eos = eos if eos is not None else common_token(ours)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    body = [[r["model"], r["workload"], r["dtype"], r["prompts"], r["max_new_tokens"], r["generated_tokens"],
             f"{r['ours_tok_s']:.0f}", f"{r['transformers_tok_s']:.0f}", f"{r['speedup']:.2f}x",
             f"{r['ours_gb_s']:.1f}", f"{100 * r['identical_outputs']:.0f}%"] for r in rows]
    lines = [f"# Greedy generation: engine vs transformers ({meta['device']})", "",
             f"`{meta['command']}`, torch {meta['torch']}, {meta['threads']} CPU threads", "",
             *common.table(["model", "workload", "dtype", "prompts", "max new", "generated", "ours tok/s",
                            "transformers tok/s", "speedup", "ours GB/s", "identical"], rows=body, align="lllrrrrrrrr")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = common.parser(__doc__, quick="64 prompts on a GPU")
    parser.add_argument("--models", nargs="*", default=None, help="registry names (GPU mode, random weights)")
    parser.add_argument("--prompts", type=int, default=None, help="default: 32 on CPU, 512 on GPU")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 on CPU, 128 on GPU")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for both sides (1: stable timings on a shared machine)")
    args = parser.parse_args(argv)
    device = common.pick_device(args, parser)
    if args.models and device.type != "cuda" and not args.dry_run:
        parser.error("--models runs registry-size models on a GPU; none is visible (run without --models on a CPU)")
    unknown = [m for m in args.models or [] if m not in REGISTRY]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}: choose from {', '.join(REGISTRY)}")
    rows = []

    def save():                                  # after every model: a time limit keeps the finished ones
        meta = common.meta(device)
        return common.write_results(args.out, common.stem("generate", common.device_name(device)),
                                    {**meta, "results": rows}, markdown(rows, meta))
    if args.models:
        n, new = (2, 3) if args.dry_run else (args.prompts or (64 if args.quick else 512), args.max_new_tokens or 128)
        for name in args.models:
            model = load_model(name, device=device, random_init=True)
            prompts = prompts_for(n, 30, 60, model.config.vocab_size)
            with TransformersSide() as side:
                rows += bench_one(name, model, side, prompts, new, hf_batch=n,
                                  max_cap=new if args.dry_run else None, cuda_graphs=not args.no_cuda_graphs)
            print(*rows[-3:], sep="\n", flush=True)
            save()
            del model
            common.free(device)
    else:
        torch.set_num_threads(args.threads)
        n, new = args.prompts or 32, args.max_new_tokens or 64
        with tempfile.TemporaryDirectory() as tmp, TransformersSide(threads=args.threads) as side:
            model = cpu_model(Path(tmp), side)
            prompts = prompts_for(n, 8, 64, model.config.vocab_size)
            rows += bench_one(f"{CPU_MODEL} shape (random)", model, side, prompts, new, hf_batch=n)
            print(*rows[-3:], sep="\n", flush=True)
    print(f"wrote {save()}.json/.md")


if __name__ == "__main__":
    main()
