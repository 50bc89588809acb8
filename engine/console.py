"""What a run says while it works, and the plain log it keeps: train.log in the run's folder.

    console = Console(out / "train.log", enabled=rank == 0)
    console.say("run: ...")                       # printed (above any progress bar) and logged, timestamped
    console.metrics({"step": 10, "loss": 0.52})   # logged only: the metric lines
    with console.progress(total, initial, "tiny-qwen2 cn 256 seed 0") as bar: ...

The log holds every line the console showed, except the progress bar's redraws, plus the metric lines,
each behind its UTC time, appended (a resumed run continues the same log). Off rank 0 nothing is printed
or written.
"""
from __future__ import annotations

import contextlib
import sys
from datetime import datetime, timezone
from pathlib import Path


class Console:
    def __init__(self, log: Path | None, enabled: bool = True):
        self.log, self.enabled = log, enabled
        self._bar = None

    def say(self, text: str) -> None:
        """Print `text` (to stderr, above a live progress bar) and append it to the log."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)
        self._append(text)

    def metrics(self, record: dict) -> None:
        """A metrics record into the log only (metrics.jsonl keeps the machine-readable copy)."""
        if self.enabled:
            self._append("metrics " + ", ".join(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"
                                                for key, value in record.items()))

    @contextlib.contextmanager
    def progress(self, total: int, initial: int, desc: str, show: bool = True):
        """The training bar: steps done of all and the time so far; the caller's postfix says the rest (its
        ETA counts the evaluations, which the bar's own rate does not see)."""
        from tqdm import tqdm
        shown = self.enabled and show
        with tqdm(total=total, initial=initial, disable=not shown, desc=desc, unit="step", dynamic_ncols=True,
                  file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                              "[{elapsed}{postfix}]") as bar:
            self._bar = bar if shown else None
            try:
                yield bar
            finally:
                self._bar = None

    def _append(self, text: str) -> None:
        if self.log is None:
            return
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log, "a", encoding="utf-8") as f:
            f.writelines(f"{stamp} {line}\n" for line in text.splitlines() or [""])


def duration(seconds: float) -> str:
    """'42s', '6m23s', '2h05m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def size(n_bytes: float) -> str:
    """'48 MB', '7.1 GB' (powers of 1000, as disks are sold)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{int(n_bytes)} B"
