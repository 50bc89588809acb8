"""One entry point: python cli.py {memorize, eval, data, ...} --help

Every failure ends with one `error: ...` line and exit status 2; add --debug anywhere for the
traceback instead."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.launch import report_error

# `bench` and `kernels` hand their arguments to the benchmark scripts (see their --help).
PASSTHROUGH = {"bench": ("bench.throughput", "training and evaluation throughput against transformers"),
               "kernels": ("bench.kernel_report", "compile every Triton launch for sm_80, sm_89 and sm_90 and report")}
DATA_FLAGS = ("lang", "length", "poems", "source", "format", "seed")
SWEEP_FLAGS = ("epochs", "poems", "lr", "batch_tokens")
CAPACITY_FLAGS = ("epochs", "lr", "batch_tokens", "micro_batch_tokens", "eval_every", "device")


def cmd_memorize(args) -> None:
    from engine.train import from_flags, memorize
    config = from_flags(args)
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        from engine.launch import launch
        resolved = config.resolved()           # every check once, here, before any process starts
        from engine.runs import check_output, leave_nothing
        out = Path(resolved.out)
        check_output(out, resolved.resume)
        created = not out.exists()
        try:
            launch(without_launcher_flags(args.argv), args.nproc_per_node)
        except BaseException:                  # rank 0 may have been stopped before it could clean up
            leave_nothing(out, created)
            raise
        return
    results = memorize(config)
    if results:                 # rank 0's
        print(f"exact recitation: {100 * results['accuracy']:.2f}% of {results['n_poems']} poems "
              f"({results['train_seconds']:.0f} s training, {results['eval_seconds']:.0f} s evaluation) -> "
              f"{results['config']['out']}/report.md")


def cmd_eval(args) -> None:
    from engine.evaluate import EVAL_SETTINGS, run_eval
    if (args.run_folder is None) == (args.model is None):
        raise ValueError("eval: name the model once: a run folder (cli.py eval RUN) or --model (a run's model/, a "
                         "model folder or a registry name)")
    results = run_eval(args.run_folder or args.model, args.out, device=args.device, overwrite=args.overwrite,
                       say=lambda line: print(line, file=sys.stderr, flush=True),
                       **{name: getattr(args, name) for name in EVAL_SETTINGS})
    print(f"exact recitation: {100 * results['accuracy']:.2f}% of {results['n_poems']} poems -> {args.out}")


def cmd_data(args) -> None:
    from engine.report import describe
    from models import load_tokenizer
    print(describe(args.lang, args.length, load_tokenizer(args.model), args.budget, source=args.source, n=args.poems,
                   seed=args.seed, fmt=args.format))


def cmd_profile(args) -> None:
    from engine.costs import profile
    from engine.roofline import roofline_table
    from models import PAPER_MODELS
    names = _names(args.models)
    print(profile(names, args.lang, args.length, args.poems, bench_dir=args.bench_dir, runs=args.runs,
                  epochs=args.epochs, out=args.out)[1])
    print("\n" + roofline_table(names or PAPER_MODELS))
    if args.capacity:                          # the GPU time of a capacity sweep (cli.py capacity) of these models
        from engine.capacity import parse_sizes, projection
        print("\n" + projection(names or PAPER_MODELS, parse_sizes(args.capacity), root=args.out,
                                 epochs=args.epochs)[1])
    print(f"profile: wrote {args.out}/profile.json and profile.png", file=sys.stderr)


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
    text, path = report(args.run_dirs, args.out)
    print(text)
    print(f"report: wrote {path} (and its plots beside it)", file=sys.stderr)


def without_launcher_flags(argv: list[str]) -> list[str]:
    """The command line each process runs: the same, less --nproc-per-node."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            kept.append(arg)
    return kept


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


class ArgumentError(ValueError, argparse.ArgumentTypeError):
    """A bad value: argparse prints its text as it is, and a direct caller gets a ValueError."""


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in text.split(",") if seed.strip()]
    except ValueError:
        seeds = []
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if not seeds or repeated:
        named = f" names {', '.join(map(str, repeated))} twice (each seed is one run)" if repeated else ""
        raise ArgumentError(f"seeds {text!r}{named}: give distinct comma-separated integers, e.g. 0,1,2")
    return seeds


def _names(text: str | None) -> list[str] | None:
    return [name for name in text.split(",") if name] if text else None


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one `error:` line (naming the command's --help), exit status 2, not the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see: python {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    from engine.train import TrainConfig, add_flags
    top = OneLineParser(prog="cli.py", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    poems = {"poems": TrainConfig.default("poems")}

    def command(name, run, text):
        p = sub.add_parser(name, help=text)
        p.set_defaults(run=run)
        return p

    p = command("memorize", cmd_memorize, "fine-tune a model to memorize poems and measure exact recitation")
    add_flags(p, given_only=True)
    p.add_argument("--config", metavar="FILE", help="a .json, .yaml or .toml file of these settings (a run's own "
                   "config.json is one); flags given beside it override it")
    p.add_argument("--nproc-per-node", type=positive_int, default=1, metavar="N",
                   help="train data-parallel in N processes on this machine (the engine of torchrun; gloo on a CPU, "
                   "NCCL on GPUs); same as: torchrun --standalone --nproc-per-node N cli.py memorize ...")

    p = command("eval", cmd_eval, "measure exact recitation of a run or any checkpoint, with the run's settings")
    p.add_argument("run_folder", nargs="?", metavar="RUN",
                   help="a memorize run's folder (its final model/, its prompt format and poems)")
    add_flags(p, ("model",) + DATA_FLAGS + ("device",), defaults=poems, given_only=True)
    p.add_argument("--out", required=True, help="a new folder for results.json and generations.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")

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
    p.add_argument("--capacity", metavar="SIZES", help="also project a capacity sweep over these comma-separated "
                   "numbers of poems (as cli.py capacity --project)")

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


def interrupted(args) -> str:
    """What an interrupted command leaves, from what is on disk."""
    command = getattr(args, "command", None)
    if command == "memorize":
        from engine.runs import checkpoints, run_dir
        out = Path(args.out or run_dir("runs", args.model or "?", args.lang or "cn", args.length or 256))
        kept = checkpoints(out) if out.is_dir() else []
        if not kept:
            return f"no checkpoint of the run in {out} was written yet, so nothing can be continued: start it again"
        return (f"{out} keeps its checkpoint of epoch {kept[0].name.split('-')[1]}: continue with "
                f"python cli.py memorize --resume --out {out}")
    if command == "eval":
        return "the evaluation wrote nothing (its files are written at its end): run it again"
    if command == "sweep":
        return "the sweep's finished runs are kept, and a run with a checkpoint resumes: run the same command again"
    return "nothing was written"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        if argv and argv[0] in PASSTHROUGH:
            import importlib
            return importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:]) or 0
        try:
            args = parser().parse_args(argv)    # imports torch and the kernels: a too-old torch is an error line
        except SystemExit as e:                 # --help, or a bad argument's one line (OneLineParser)
            return e.code
        args.argv = argv
        from engine.train import check_value
        for name, value in vars(args).items():      # every command's run settings, before anything is loaded
            check_value(name, value)
        args.run(args)
    except KeyboardInterrupt:
        report_error(f"error: interrupted: {interrupted(args)}")
        return 2
    except Exception as e:
        if debug:
            raise
        known = isinstance(e, (ValueError, OSError, RuntimeError)) and not isinstance(e, NotImplementedError)
        report_error(f"error: {e}" if known else f"error: {type(e).__name__}: {e} (run again with --debug for the "
                     "traceback, and please report it)")
        return 2
    return 0


if __name__ == "__main__":
    status = main()
    if "RANK" in os.environ:                 # one of torchrun's processes (or --nproc-per-node's)
        from engine.distributed import exit_rank
        exit_rank(status)
    sys.exit(status)
