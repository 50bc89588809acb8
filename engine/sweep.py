"""Sweeps: memorize every model x language x length, then the paper's tables over the finished runs.

    results = sweep(["qwen2-0.5b"], ["cn"], [256, 512])      # cli.py sweep
    results = sweep(["qwen2-0.5b"], ["cn"], [256], seeds=[0, 1, 2])     # cli.py sweep --seeds 0,1,2
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine.report import report
from engine.runs import find_runs, is_run_folder, run_dir
from engine.train import TrainConfig, config_flags, memorize
from models import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def seed_run_dir(root, model: str, lang: str, length: int, seed: int) -> Path:
    """A sweep's run folder: runs.run_dir for seed 0 (the default run), with -seed{seed} for the others."""
    folder = run_dir(root, model, lang, length)
    return folder if seed == 0 else folder.with_name(f"{folder.name}-seed{seed}")


def sweep(models: list[str], langs: list[str], lengths: list[int], out_root="runs/sweep", seeds=(0,),
          **train_overrides) -> list[dict]:
    """memorize() for every (model, lang, length, seed), then report() over the finished runs.

    A run whose folder holds results.json is skipped; one with a checkpoint is resumed. One GPU or
    none: the runs go one after the other in this process; several GPUs: one `cli.py memorize`
    subprocess per GPU (CUDA_VISIBLE_DEVICES), its log in the run folder's memorize.log.
    train_overrides: TrainConfig fields (epochs=, poems=, lr=, ...); a dict value is looked up by
    language (source={"en": "poems-en.jsonl"}). seeds: each seed is a run of its own (its poem
    sample, data order and a preset's weights), which report() aggregates. Returns the finished
    runs' results.json.
    """
    unknown = [model for model in models if not Path(model).is_dir() and model not in REGISTRY]
    if unknown:
        raise ValueError(f"sweep: unknown model {', '.join(unknown)}: not a folder and not one of {', '.join(REGISTRY)} "
                         "(nothing was trained)")
    pending, folders = [], []
    for model, lang, length, seed in itertools.product(models, langs, lengths, seeds):
        out = seed_run_dir(out_root, model, lang, length, seed)
        folders.append(out)
        if (out / "results.json").is_file():
            print(f"sweep: {out} is finished, skipped", file=sys.stderr)
            continue
        overrides = {name: value.get(lang) if isinstance(value, dict) else value
                     for name, value in train_overrides.items()}
        pending.append(TrainConfig(model=model, lang=lang, length=length, seed=seed, out=str(out),
                                   resume=is_run_folder(out), **overrides))
    for config in pending:              # every setting checked before the first run trains
        config.resolved()
    gpus = torch.cuda.device_count()
    failures = _run_subprocesses(pending, gpus) if gpus > 1 else _run_in_process(pending)
    finished = [folder for folder in folders if (folder / "results.json").is_file()]
    if finished:
        report([str(folder) for folder in finished], out=out_root)
    if failures:
        raise RuntimeError("sweep: these runs failed (finished ones are reported in "
                           f"{Path(out_root) / 'report.md'}; run the sweep again to resume):\n  " + "\n  ".join(failures))
    return find_runs(finished)


def _run_in_process(configs) -> list[str]:
    failures = []
    for config in configs:
        try:
            memorize(config)
        except Exception as e:          # the other runs still go; the failure is reported at the end
            failures.append(f"{config.out}: {type(e).__name__}: {e}")
    return failures


def cli_arguments(config: TrainConfig) -> list[str]:
    """`cli.py memorize` arguments that the CLI parses back into `config`."""
    return ["memorize", *config_flags(config)]


def _run_subprocesses(configs, gpus: int) -> list[str]:
    queue, running, failures = list(configs), {}, []
    while queue or running:
        for gpu in [g for g in range(gpus) if g not in running]:
            if not queue:
                break
            config = queue.pop(0)
            log = (Path(config.out) / "memorize.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            running[gpu] = (config, subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *cli_arguments(config)],
                                                     env=env, stdout=log.open("a"), stderr=subprocess.STDOUT))
        for gpu, (config, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[gpu]
                if proc.returncode:
                    failures.append(f"{config.out}: exit status {proc.returncode}, see {config.out}/memorize.log")
        time.sleep(1)
    return failures
