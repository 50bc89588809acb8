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
                         log_every=args.log_every)
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
    p.add_argument("--batch-tokens", type=int, help="tokens per optimizer step (default 16384; 256 for tiny presets)")
    p.add_argument("--micro-batch-tokens", type=int, help="tokens per forward/backward (default: --batch-tokens)")
    p.add_argument("--eval-every", type=int, default=10, help="epochs between recitation evaluations")
    p.add_argument("--out", help="output folder (default runs/MODEL-LANG-LENGTH)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
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
    return top


def main(argv=None) -> int:
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
