"""Where a result came from: the command, the software, the engine's commit, the model's files, the host.

A number in a paper must lead back to what produced it, so every run and evaluation records

    {"command": ..., "versions": {...}, "engine": {"commit", "dirty"}, "model": {"name", "path", "hub_id",
     "revision", "weights_sha256"}, "host": ..., "device": ...}

next to its data fingerprint and its start and end times (engine/train.py and engine/evaluate.py add those).
Versions are read from the installed distributions' metadata, so recording them imports nothing
(transformers in particular: it never runs in the engine's process).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "tokenizers", "safetensors", "numpy", "transformers", "flash-attn")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def now() -> str:
    """The current time, UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command() -> str:
    """The command line as a shell would take it back."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def versions(device: torch.device | str | None = None) -> dict:
    """python, the installed versions of PACKAGES (None where absent), CUDA, and on a GPU its driver."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    if device is not None and torch.device(device).type == "cuda":
        found["driver"] = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or None
    return found


def engine_commit() -> dict:
    """The checkout's git commit and whether its tracked files differ from it (None outside a git checkout)."""
    commit = _run("git", "-C", str(ROOT), "rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = _run("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def model_source(name: str, folder: Path | None, hub_id: str | None) -> dict:
    """What the weights were: the folder they were read from, the hub id and snapshot revision where the
    folder is a Hugging Face cache snapshot, and the sha256 of each weight file (None for a preset's
    random initialisation, which the run's seed determines)."""
    revision = None
    if folder is not None:
        folder = Path(folder).resolve()
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            revision = folder.name
            hub_id = hub_id or folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    return {"name": name, "path": str(folder) if folder else None, "hub_id": hub_id, "revision": revision,
            "weights_sha256": weight_digests(folder) if folder else None}


def weight_digests(folder: Path) -> dict[str, str]:
    """sha256 of every weight file in `folder` (safetensors shards or pytorch_model.bin), by file name."""
    return {path.name: file_sha256(path) for path in sorted(Path(folder).iterdir())
            if path.suffix in WEIGHT_SUFFIXES and path.is_file()}


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(model: dict, device) -> dict:
    """Everything above for a run or evaluation on `device` of the model described by model_source()."""
    return {"command": command(), "versions": versions(device), "engine": engine_commit(), "model": model,
            "host": platform.node(), "device": device_name(device)}


def _run(*argv: str) -> str | None:
    """A command's stripped output ("" when it printed nothing), None when it is missing or fails."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
