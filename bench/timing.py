"""Timing and peak memory, in torch and the standard library alone: the benchmark scripts use it through
bench.common, and the transformers side (bench/transformers_side.py), whose process must not import the
engine's packages, loads this file by its path."""
from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timer:
    """Medians of repeated calls: CUDA events around each call on a GPU, perf_counter on the CPU.
    Warm-up calls first, so compilation, autotuning and lazy allocation stay out of the numbers."""
    device: torch.device
    warmup: int = 3
    reps: int = 20

    def median_ms(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            return 1e3 * statistics.median(self.seconds(fn)[1] for _ in range(self.reps))
        sync(self.device)
        events = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        sync(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events)

    def seconds(self, fn):
        """-> (fn(), wall seconds of that one call, the device synchronized before and after)."""
        sync(self.device)
        t0 = time.perf_counter()
        result = fn()
        sync(self.device)
        return result, time.perf_counter() - t0


def free(device) -> None:
    """Collect garbage and hand cached memory back (CUDA cache; the C heap on the CPU), so that
    the next peak starts clean."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above what was live on entry: GPU max_memory_allocated; CPU resident memory,
    sampled every 2 ms by a thread. Use as `with PeakMemory(device) as mem: ...; mem.bytes`."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.base = self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "PeakMemory":
        free(self.device)
        if self.device.type == "cuda":
            sync(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def median_ms_and_peak(fn, timer: Timer) -> tuple[float, int]:
    """(median ms of fn(), peak bytes it allocates above what was live before); one untimed call
    first, outside the memory window (compilation, autotuning, lazy optimizer state)."""
    fn()
    with PeakMemory(timer.device) as mem:
        ms = timer.median_ms(fn)
    return ms, mem.bytes


def time_steps(step, inputs: list, tokens: list[int], warmup: int, device) -> dict:
    """step(x) for the first `warmup` inputs untimed, then each other one timed: tokens/s of the median step
    (tokens[i]: the real tokens of inputs[i]) and each timed step's seconds."""
    timer = Timer(torch.device(device))
    for x in inputs[:warmup]:
        step(x)
    seconds = [timer.seconds(lambda: step(x))[1] for x in inputs[warmup:]]
    return {"tokens_per_second": statistics.median(n / t for n, t in zip(tokens[warmup:], seconds)),
            "step_times": seconds}
