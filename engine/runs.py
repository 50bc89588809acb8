"""A run's folder on disk: its name, its checkpoints, its metrics.jsonl, and the finished runs.

    runs/MODEL-LANG-LENGTH/
        config.json  metrics.jsonl  latest  checkpoint-EPOCH/{model/, trainer.pt}
        results.json  generations.jsonl  report.md  curve.png  model/      (once finished)

A checkpoint is written into a hidden temporary folder, renamed into place, and only then named
by the `latest` pointer (itself replaced atomically), so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from models.weights import checkpoint_files, iter_tensors


class TrainingError(RuntimeError):
    pass


def run_dir(root, model: str, lang: str, length: int) -> Path:
    """runs/{model}-{lang}-{length}: a model folder is named by its last component."""
    return Path(root) / f"{Path(model).name}-{lang}-{length}"


def prepare_output(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to the output directory {out} ({e.strerror}): pass --out with a "
                            "writable folder") from None
    if not resume and latest_checkpoint(out) is not None:
        raise TrainingError(f"{out} already holds a run: pass --resume to continue it, or another --out")


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(out: Path, model, tokenizer, opt, epoch: int, step: int, totals: dict, config) -> None:
    """checkpoint-{epoch}/ (HF model + trainer.pt), then the `latest` pointer swapped atomically."""
    final = out / f"checkpoint-{epoch}"
    tmp = out / f".checkpoint-{epoch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model", tokenizer)
    torch.save({"optimizer": opt.state_dict(), "epoch": epoch, "step": step, "totals": totals, "config": asdict(config),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = out / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, out / "latest")
    for old in out.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = Path(out) / "latest"
    return Path(out) / pointer.read_text().strip() if pointer.is_file() else None


def restore(checkpoint: Path, model, opt) -> tuple[int, int, dict]:
    """Load model weights, optimizer and RNG state; returns (epochs done, steps done, running totals)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path in checkpoint_files(checkpoint / "model"):
            for name, tensor in iter_tensors(path):
                params[name].copy_(tensor)
    state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["epoch"], state["step"], state["totals"]


# ---------------------------------------------------------------- metrics and results

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class Metrics:
    """metrics.jsonl, appended line by line (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.is_file():        # resume: drop lines after the checkpoint
            lines = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in lines))
        elif enabled:
            path.write_text("")

    def log(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def find_runs(run_dirs=None, root="runs") -> list[dict]:
    """results.json of finished memorize runs (the given folders, or every one under `root`), with run_dir."""
    paths = ([Path(d) / "results.json" for d in run_dirs] if run_dirs is not None
             else sorted(Path(root).glob("**/results.json")))
    runs = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no results.json: it is not a finished memorize run")
        runs.append({**json.loads(path.read_text(encoding="utf-8")), "run_dir": str(path.parent)})
    return runs


def run_gpu_seconds(run: dict) -> float:
    """Device-seconds of a run: training, recitation evaluations and scoring (bits), on every device."""
    return (run["train_seconds"] + run["eval_seconds"] + run.get("score_seconds", 0.0)) * run.get("world_size", 1)
