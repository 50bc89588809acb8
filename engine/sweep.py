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
from dataclasses import replace
from pathlib import Path

import torch

from engine.report import report
from engine.data import LENGTH_BINS, load_poems
from engine.runs import find_runs, is_run_folder, run_dir, run_settings
from engine.train import TrainConfig, config_flags, differing_settings, flag, memorize, shown
from models import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def seed_run_dir(root, model: str, lang: str, length: int, seed: int) -> Path:
    """A sweep's run folder: runs.run_dir for seed 0 (the default run), with -seed{seed} for the others."""
    folder = run_dir(root, model, lang, length)
    return folder if seed == 0 else folder.with_name(f"{folder.name}-seed{seed}")


def sweep(models: list[str], langs: list[str], lengths: list[int], out_root="runs/sweep", seeds=(0,),
          **train_overrides) -> list[dict]:
    """memorize() for every (model, lang, length, seed), then report() over the finished runs.

    Everything is checked before the first run trains: the models, languages, lengths, seeds and
    sources, that no two runs share a folder, and that a finished run in a folder was made with the
    settings asked for now (one with other settings stops the sweep: it is never reused, nor mixed into
    the report). A finished run is kept; one with a checkpoint is resumed. One GPU or none: the runs go
    one after the other in this process; several GPUs: one `cli.py memorize` subprocess per GPU
    (CUDA_VISIBLE_DEVICES), its log in the run folder's memorize.log. train_overrides: TrainConfig
    fields (epochs=, poems=, lr=, ...); a dict value is looked up by language (source={"en": "poems-en.jsonl"}).
    seeds: each seed is a run of its own (its poem sample, data order and a preset's weights), which
    report() aggregates. Returns the finished runs' results.json.
    """
    configs = planned(models, langs, lengths, out_root, seeds, train_overrides)
    pending = []
    for config in configs:
        if (Path(config.out) / "results.json").is_file():
            print(f"sweep: {config.out}: finished with these settings, kept", file=sys.stderr)
        else:
            pending.append(replace(config, resume=is_run_folder(config.out)))
    gpus = torch.cuda.device_count()
    failures = _run_subprocesses(pending, gpus) if gpus > 1 else _run_in_process(pending)
    finished = [Path(config.out) for config in configs if (Path(config.out) / "results.json").is_file()]
    path = report([str(folder) for folder in finished], out=out_root)[1] if finished else None
    runs = find_runs(finished)
    for run in runs:
        print(f"sweep: {run['run_dir']}: {100 * run['accuracy']:.2f}% of {run['n_poems']} poems", file=sys.stderr)
    print(f"sweep: {len(runs)} of {len(configs)} runs finished" + (f"; report: {path}" if path else ""), file=sys.stderr)
    if failures:
        raise RuntimeError("sweep: these runs failed (run the same command again to resume them):\n  "
                           + "\n  ".join(failures))
    return runs


def planned(models, langs, lengths, out_root, seeds, overrides) -> list[TrainConfig]:
    """Every run of the sweep as a resolved TrainConfig, all of them checked before any trains."""
    unknown = [model for model in models if not Path(model).is_dir() and model not in REGISTRY]
    if unknown:
        raise ValueError(f"sweep: unknown model {', '.join(unknown)}: not a folder and not one of {', '.join(REGISTRY)} "
                         "(nothing was trained)")
    for name, values, allowed in (("--lang", langs, ("cn", "en")), ("--length", lengths, tuple(LENGTH_BINS))):
        wrong = [str(value) for value in values if value not in allowed]
        if wrong:
            raise ValueError(f"sweep: {name} {', '.join(wrong)}: choose from {', '.join(map(str, allowed))}")
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise ValueError(f"sweep: --seeds names {', '.join(map(str, repeated))} twice: each seed is one run")
    configs = []
    for model, lang, length, seed in itertools.product(models, langs, lengths, seeds):
        settings = {name: value.get(lang) if isinstance(value, dict) else value for name, value in overrides.items()}
        config = TrainConfig(model=model, lang=lang, length=length, seed=seed,
                             out=str(seed_run_dir(out_root, model, lang, length, seed)), **settings).resolved()
        load_poems(lang, length, config.poems, seed, config.source)     # the source and its poems, read now
        configs.append(config)
    folders = [config.out for config in configs]
    shared = sorted({folder for folder in folders if folders.count(folder) > 1})
    if shared:
        raise ValueError(f"sweep: several runs would share {', '.join(shared)} (two model folders with the same "
                         "name?): give the models folders of different names")
    for config in configs:
        stale(config)
    return configs


def stale(config: TrainConfig) -> None:
    """A finished run in the folder made with other settings than the ones asked for stops the sweep."""
    if not (Path(config.out) / "results.json").is_file():
        return
    differences = [f"{flag(name)} {shown(old)} (asked: {shown(value)})"
                   for name, value, old in differing_settings(config, run_settings(config.out) or {})]
    if differences:
        raise ValueError(f"sweep: {config.out} holds a finished run with other settings: {'; '.join(differences)}. "
                         "Nothing was trained: pass another --out-root, or move that run away")


def _run_in_process(configs) -> list[str]:
    failures = []
    for number, config in enumerate(configs, 1):
        print(f"sweep: run {number} of {len(configs)}: {config.model} {config.lang}-{config.length} seed {config.seed} "
              f"-> {config.out}" + (" (resuming)" if config.resume else ""), file=sys.stderr, flush=True)
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
            print(f"sweep: GPU {gpu}: {config.model} {config.lang}-{config.length} seed {config.seed} -> {config.out} "
                  f"(its log: {log})", file=sys.stderr, flush=True)
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
