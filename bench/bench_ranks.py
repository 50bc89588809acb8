"""Training time of one run on N ranks (FSDP2) against the same run in one process: each run's own
train_seconds (results.json: the epochs' wall time, without start-up, scoring and evaluation), the
two commands in turn, median of the repeats and the ratio pair by pair.

    python bench/bench_ranks.py                      # tiny-qwen2, 96 poems, 3 epochs, 4,096 tokens a step, 2 ranks
    python bench/bench_ranks.py --nproc 4 --repeats 5

On the CPU each rank is a gloo process with OMP_NUM_THREADS=1 (the compute-bound workload of issue #25:
the ratio is the training time of N ranks over one, ideally 1/N); on GPUs, NCCL.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def train_seconds(args: list[str], out: Path, nproc: int) -> float:
    command = [sys.executable, str(CLI), "memorize", *args, "--out", str(out), "--eval-every", "1000",
               "--checkpoint-every", "0", "--nproc-per-node", str(nproc)]
    subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    return json.loads((out / "results.json").read_text())["train_seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--poems", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    options = parser.parse_args(argv)
    run = ["--model", options.model, "--poems", str(options.poems), "--epochs", str(options.epochs),
           "--batch-tokens", str(options.batch_tokens)]
    times = {1: [], options.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(options.repeats):
            for nproc in times:
                times[nproc].append(train_seconds(run, Path(tmp) / f"{nproc}-{repeat}", nproc))
                print(f"repeat {repeat + 1}: {nproc} rank{'s' * (nproc > 1)}: {times[nproc][-1]:.2f} s", flush=True)
    ratios = [many / one for one, many in zip(times[1], times[options.nproc])]
    print(f"training seconds, median of {options.repeats}: 1 rank {statistics.median(times[1]):.2f}, "
          f"{options.nproc} ranks {statistics.median(times[options.nproc]):.2f}; ratio {options.nproc}/1 median "
          f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
