"""One entry point: python cli.py {memorize, eval, data, ...} --help

Every failure ends with one `error: ...` line and exit status 2; add --debug anywhere for the
traceback instead."""
from __future__ import annotations

import argparse
import sys

# `bench` and `kernels` hand their arguments to the benchmark scripts (see their --help).
PASSTHROUGH = {"bench": ("bench.throughput", "training and evaluation throughput against transformers"),
               "kernels": ("bench.kernel_report", "compile every Triton launch for sm_80, sm_89 and sm_90 and report")}
DATA_FLAGS = ("lang", "length", "poems", "source", "format", "seed")
SWEEP_FLAGS = ("epochs", "poems", "lr", "batch_tokens")
CAPACITY_FLAGS = ("epochs", "lr", "batch_tokens", "micro_batch_tokens", "eval_every", "device")


def cmd_memorize(args) -> None:
    from engine.train import from_flags, memorize
    results = memorize(from_flags(args))
    if results:                 # rank 0's
        print(f"exact recitation: {100 * results['accuracy']:.2f}% of {results['n_poems']} poems "
              f"({results['train_seconds']:.0f} s training, {results['eval_seconds']:.0f} s evaluation) -> "
              f"{results['config']['out']}/report.md")


def cmd_eval(args) -> None:
    from engine.evaluate import run_eval
    results = run_eval(args.model, args.lang, args.length, args.poems, args.out, device=args.device,
                       source=args.source, seed=args.seed, fmt=args.format)
    print(f"exact recitation: {100 * results['accuracy']:.2f}% of {results['n_poems']} poems -> {args.out}")


def cmd_data(args) -> None:
    from engine.report import describe
    from models import load_tokenizer
    print(describe(args.lang, args.length, load_tokenizer(args.model), args.budget, source=args.source, n=args.poems,
                   seed=args.seed, fmt=args.format))


def cmd_profile(args) -> None:
    from engine.costs import profile
    print(profile(_names(args.models), args.lang, args.length, args.poems, bench_dir=args.bench_dir, runs=args.runs,
                  epochs=args.epochs, out=args.out)[1])


def cmd_sweep(args) -> None:
    from engine.sweep import sweep
    overrides = {name: getattr(args, name) for name in SWEEP_FLAGS if getattr(args, name) is not None}
    if args.source:
        overrides["source"] = {"en": args.source}
    sweep(_names(args.models), _names(args.lang), [int(n) for n in _names(args.length)], args.out_root,
          seeds=args.seeds, **overrides)


def cmd_capacity(args) -> None:
    from engine.capacity import capacity, parse_sizes, projection
    models, sizes, seeds = _names(args.models), parse_sizes(args.sizes), seed_list(args.seeds)
    if args.project:
        print(projection(models, sizes, seeds, args.out_root, args.epochs)[1])
        return
    overrides = {name: getattr(args, name) for name in CAPACITY_FLAGS if getattr(args, name) is not None}
    print(capacity(models, sizes, seeds, args.out_root, **overrides)["report"])


def cmd_report(args) -> None:
    from engine.report import report
    print(report(args.run_dirs, args.out))


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in text.split(",") if seed.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds {text!r}: give distinct comma-separated integers, e.g. 0,1,2")
    return seeds


def _names(text: str | None) -> list[str] | None:
    return [name for name in text.split(",") if name] if text else None


def parser() -> argparse.ArgumentParser:
    from engine.train import TrainConfig, add_flags
    top = argparse.ArgumentParser(prog="cli.py", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    poems = {"poems": TrainConfig.default("poems")}

    def command(name, run, text):
        p = sub.add_parser(name, help=text)
        p.set_defaults(run=run)
        return p

    add_flags(command("memorize", cmd_memorize, "fine-tune a model to memorize poems and measure exact recitation"))

    p = command("eval", cmd_eval, "measure exact recitation of any checkpoint")
    add_flags(p, ("model",) + DATA_FLAGS + ("device",), defaults=poems)
    p.add_argument("--out", required=True)

    p = command("data", cmd_data, "dataset statistics: counts, lengths, packing efficiency")
    p.add_argument("--model", default="tiny-qwen2", help="whose tokenizer counts the tokens")
    add_flags(p, DATA_FLAGS, defaults=poems)
    p.add_argument("--budget", type=int, default=TrainConfig.default("batch_tokens"),
                   help="tokens per packed batch (default: the training micro-batch)")

    p = command("profile", cmd_profile, "the cost of memorization per model size (measured or projected)")
    p.add_argument("--models", help="comma-separated (default: the paper's seven)")
    add_flags(p, ("lang", "length", "poems", "epochs"), defaults=poems)
    p.add_argument("--bench-dir", default="bench/results", help="where throughput-<device>.json results are")
    p.add_argument("--runs", nargs="*", help="finished run folders (default: runs/**)")
    p.add_argument("--out", default="runs/profile")

    p = command("sweep", cmd_sweep, "memorize every model x language x length, then the paper's tables")
    p.add_argument("--models", required=True, help="comma-separated registry names or folders")
    p.add_argument("--lang", default="cn", help="comma-separated: cn,en")
    p.add_argument("--length", default="256", help="comma-separated: 256,512")
    p.add_argument("--source", help="the English poems file (no English set ships with the engine)")
    p.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated seeds, a run each (poem sample, "
                   "data order, preset weights); the report gives their mean and spread (default 0)")
    add_flags(p, SWEEP_FLAGS, defaults=dict.fromkeys(SWEEP_FLAGS))      # None: memorize's defaults
    p.add_argument("--out-root", default="runs/sweep")

    p = command("capacity", cmd_capacity, "memorization capacity: one run per number of poems, then the knee")
    p.add_argument("--models", required=True, help="comma-separated registry names or folders")
    p.add_argument("--poems", dest="sizes", required=True, help="comma-separated ascending numbers of poems, each "
                   "the first n of the nested sample data/poems-cn-256-nested.jsonl.gz, e.g. 1000,2000,4000")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, a run each per size (default 0)")
    add_flags(p, CAPACITY_FLAGS, defaults=dict.fromkeys(CAPACITY_FLAGS))      # None: memorize's defaults
    p.add_argument("--out-root", default="runs/capacity")
    p.add_argument("--project", action="store_true", help="train nothing: project the sweep's GPU time")

    p = command("report", cmd_report, "rebuild the tables and plots from finished runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out")

    for name, (_, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=text + " (its own --help)", add_help=False)
    return top


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        if argv and argv[0] in PASSTHROUGH:
            import importlib
            return importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:]) or 0
        args = parser().parse_args(argv)        # imports torch and the kernels: a too-old torch is an error line
        from engine.train import check_value
        for name, value in vars(args).items():      # every command's run settings, before anything is loaded
            check_value(name, value)
        args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted: a run keeps its last checkpoint (continue it with --resume)", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        known = isinstance(e, (ValueError, OSError, RuntimeError)) and not isinstance(e, NotImplementedError)
        print(f"error: {e}" if known else f"error: {type(e).__name__}: {e} (run again with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
