"""One entry point: python cli.py {memorize, eval, data, ...} --help"""
from __future__ import annotations

import argparse
import sys


def cmd_memorize(args) -> None:
    from engine.train import TrainConfig, memorize
    config = TrainConfig(model=args.model, lang=args.lang, length=args.length, poems=args.poems, epochs=args.epochs,
                         lr=args.lr, batch_tokens=args.batch_tokens, micro_batch_tokens=args.micro_batch_tokens,
                         eval_every=args.eval_every, seed=args.seed, out=args.out, resume=args.resume,
                         schedule=args.schedule, format=args.format, source=args.source, device=args.device,
                         log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                         warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                         max_grad_norm=args.max_grad_norm)
    results = memorize(config)
    if results:
        print(f"exact recitation: {100 * results['accuracy']:.2f}% of {results['n_poems']} poems "
              f"({results['train_seconds']:.0f} s training, {results['eval_seconds']:.0f} s evaluation) -> "
              f"{config.resolved().out}/report.md")


def cmd_eval(args) -> None:
    from engine.evaluate import run_eval
    results = run_eval(args.model, args.lang, args.length, args.poems, args.out, device=args.device,
                       source=args.source, seed=args.seed, fmt=args.format)
    print(f"exact recitation: {100 * results['accuracy']:.2f}% of {results['n_poems']} poems -> {args.out}")


def cmd_data(args) -> None:
    from engine.data import describe
    from models import load_tokenizer
    print(describe(args.lang, args.length, load_tokenizer(args.model), args.budget, source=args.source, n=args.poems,
                   seed=args.seed, fmt=args.format))


def cmd_profile(args) -> None:
    from engine.experiments import profile
    _, table = profile(_names(args.models), args.lang, args.length, args.poems, bench_dir=args.bench_dir,
                       runs=args.runs, epochs=args.epochs, out=args.out)
    print(table)


def cmd_sweep(args) -> None:
    from engine.experiments import sweep
    overrides = {k: v for k, v in (("epochs", args.epochs), ("poems", args.poems), ("lr", args.lr),
                                   ("batch_tokens", args.batch_tokens)) if v is not None}
    if args.source:
        overrides["source"] = {"en": args.source}
    sweep(_names(args.models), _names(args.lang), [int(x) for x in _names(args.length)], args.out_root, **overrides)


def cmd_report(args) -> None:
    from engine.experiments import report
    print(report(args.run_dirs, args.out))


def _names(text: str | None) -> list[str] | None:
    return [x for x in text.split(",") if x] if text else None


# `bench` and `kernels` hand their arguments to the benchmark scripts (see their --help).
PASSTHROUGH = {"bench": ("bench.throughput", "training and evaluation throughput against transformers"),
               "kernels": ("bench.kernel_report", "compile every Triton launch for the H100 and report")}


def add_data_arguments(p, poems_default=None) -> None:
    p.add_argument("--lang", choices=["cn", "en"], default="cn")
    p.add_argument("--length", type=int, choices=[256, 512], default=256,
                   help="prompt + poem characters: 256 (<= 256) or 512 (257..512, the paper's Table 2)")
    p.add_argument("--poems", type=int, default=poems_default, help="poems to sample (default: 2000; 32 for tiny presets)")
    p.add_argument("--source", help="a local .parquet/.jsonl/.json/.csv file or a hub dataset (default: the frozen CN set)")
    p.add_argument("--format", choices=["chat", "plain"], help="prompt format (default: chat for chat/instruct models)")
    p.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cli.py", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("memorize", help="fine-tune a model to memorize poems and measure exact recitation")
    p.add_argument("--model", required=True, help="a registry name (qwen2-0.5b, bloom-560m, tiny-qwen2, ...) or a folder")
    add_data_arguments(p)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-5; 3e-3 for tiny presets)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 3%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="on matrices only (not norms, biases, embeddings)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="global gradient-norm clipping")
    p.add_argument("--batch-tokens", type=int, help="tokens per optimizer step (default 8192, ~64 poems: ~30 updates per epoch of 2,000; 256 for tiny presets)")
    p.add_argument("--micro-batch-tokens", type=int, help="tokens per forward/backward (default: --batch-tokens)")
    p.add_argument("--eval-every", type=int, default=10, help="epochs between recitation evaluations")
    p.add_argument("--out", help="output folder (default runs/MODEL-LANG-LENGTH)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints (and the last)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metric lines (each one syncs the host)")
    p.set_defaults(run=cmd_memorize)

    p = sub.add_parser("eval", help="measure exact recitation of any checkpoint")
    p.add_argument("--model", required=True)
    add_data_arguments(p, poems_default=2000)
    p.add_argument("--out", required=True)
    p.add_argument("--device")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("data", help="dataset statistics: counts, lengths, packing efficiency")
    p.add_argument("--model", default="tiny-qwen2", help="whose tokenizer counts the tokens")
    add_data_arguments(p, poems_default=2000)
    p.add_argument("--budget", type=int, default=16384, help="tokens per packed batch")
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("profile", help="the cost of memorization per model size (measured or projected)")
    p.add_argument("--models", help="comma-separated (default: the paper's seven)")
    p.add_argument("--lang", choices=["cn", "en"], default="cn")
    p.add_argument("--length", type=int, choices=[256, 512], default=256)
    p.add_argument("--poems", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--bench-dir", default="bench/results", help="where throughput-<device>.json results are")
    p.add_argument("--runs", nargs="*", help="finished run folders (default: runs/**)")
    p.add_argument("--out", default="runs/profile")
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser("sweep", help="memorize every model x language x length, then the paper's tables")
    p.add_argument("--models", required=True, help="comma-separated registry names or folders")
    p.add_argument("--lang", default="cn", help="comma-separated: cn,en")
    p.add_argument("--length", default="256", help="comma-separated: 256,512")
    p.add_argument("--source", help="the English poems file (no English set ships with the engine)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--poems", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--out-root", default="runs/sweep")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("report", help="rebuild the tables and plots from finished runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out")
    p.set_defaults(run=cmd_report)

    for name, (_, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=text + " (its own --help)", add_help=False)
    return top


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        import importlib
        return importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:]) or 0
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if isinstance(e, NotImplementedError) or "--debug" in sys.argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
