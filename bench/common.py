"""What every benchmark script shares: its arguments, timing, peak memory, the device's name and
figures, and the JSON + markdown it writes.

    args, device, timer = common.start(common.parser(__doc__), needs_cuda=True)   # --out --device --quick --dry-run
    ms = timer.median_ms(fn)                     # warm-up calls, then the median of timed calls
    with common.PeakMemory(device) as mem:       # mem.bytes: peak above what was live before
        fn()
    common.write_results(args.out, common.stem("kernels", common.device_name(device)), data, markdown)

`--dry-run` runs a script on the CPU at tiny sizes with one timed call and no warm-up, so that bench/gpu.sh
--dry-run catches an import, path or argument error before a GPU lease is spent on it; Triton
kernels then run under the interpreter (set here, before any kernel module is imported).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

if "--dry-run" in sys.argv:          # @triton.jit picks interpreted vs compiled when a kernel module loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.hardware import Hardware, lookup  # noqa: E402

RESULTS = Path("runs") / "bench"     # the user's; the recorded results in bench/results/ are rewritten only when --out names them
MiB = 1 << 20


# ---------------------------------------------------------------- arguments and device

def parser(doc: str, quick: str = "fewer shapes and steps") -> argparse.ArgumentParser:
    """The arguments every script takes; a script adds its own to the returned parser."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the JSON and markdown results (default: {RESULTS})")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU, one timed call: checks that the script runs, measures nothing")
    return p


def pick_device(args, p: argparse.ArgumentParser, needs_cuda: bool = False) -> torch.device:
    """--dry-run: the CPU. Else --device, or CUDA when there is one; parser error (exit 2) when a
    GPU-only benchmark finds none."""
    if args.dry_run:
        return torch.device("cpu")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA GPU")
    if needs_cuda and device.type != "cuda":
        p.error("this benchmark times Triton kernels on a CUDA GPU and none is visible; "
                "--dry-run runs it on the CPU at tiny sizes (a smoke test, no numbers)")
    return device


def start(p: argparse.ArgumentParser, argv=None, needs_cuda: bool = False, warmup: int = 3, reps: int = 20):
    """Parse the arguments and pick the device: (args, device, its Timer)."""
    args = p.parse_args(argv)
    device = pick_device(args, p, needs_cuda)
    return args, device, Timer(device, 0, 1) if args.dry_run else Timer(device, warmup, reps)


def device_name(device) -> str:
    """'NVIDIA H200', or 'cpu' (the name cli.py profile matches benchmarks by)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def hardware(device) -> Hardware | None:
    """The device's row of kernels/hardware.py (peak and measured figures), None for the CPU or an
    unknown card."""
    return lookup(device_name(device)) if torch.device(device).type == "cuda" else None


def stem(kind: str, name: str) -> str:
    """File stem of a result on the device called `name`: 'throughput-NVIDIA-H200', 'kernels-cpu'."""
    return f"{kind}-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}"


def meta(device) -> dict:
    """Where and with what a result was measured."""
    return {"device": device_name(device), "torch": torch.__version__, "triton": optional("triton", "__version__"),
            "host": platform.machine(), "threads": torch.get_num_threads(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


# ---------------------------------------------------------------- timing and memory

from bench.timing import PeakMemory, Timer, free, median_ms_and_peak, sync, time_steps  # noqa: E402,F401  (re-exported)


def optional(module: str, name: str):
    """module.name when that package is installed (Liger-Kernel's ops, triton), else None."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def guarded(fn, strict: bool) -> dict:
    """fn() -> dict, or {"status": "OOM" | "error: ..."} when a peer fails (another Liger version,
    a shape that does not fit), so one failure does not lose a GPU run. `strict` (--dry-run)
    raises instead: there an error is a bug in the script."""
    try:
        return fn()
    except Exception as e:
        if strict:
            raise
        if isinstance(e, torch.OutOfMemoryError):
            free("cuda")
            return {"status": "OOM"}
        return {"status": f"error: {type(e).__name__}: {e}"[:200]}


# ---------------------------------------------------------------- output

def table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """Markdown table lines; `align` one character per column: 'l' or 'r' (default: all left)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    return [f"| {' | '.join(map(str, r))} |" for r in [header, rule, *rows]]


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def write_results(out_dir, name: str, data: dict, markdown: str) -> Path:
    """out_dir/name.json and out_dir/name.md; returns out_dir/name."""
    path = Path(out_dir) / name
    write_json(path.parent / f"{name}.json", data)
    (path.parent / f"{name}.md").write_text(markdown)
    return path
