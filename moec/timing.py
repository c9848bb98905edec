"""Timing helpers shared by ``moec bench``, ``moec compile --autotune`` and ``bench/``.

Candidates are timed in round-robin rounds (each candidate once per round, the median of a few
calls), each figure being the median of its rounds: a burst of load on a shared host then falls
on every candidate alike instead of on whichever ran during it.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "SETTLE_S",
    "cpu_model",
    "median_ms",
    "median_s",
    "relative_times",
    "round_robin",
    "settled_median_ms",
]

# ORT's worker threads spin for a while after a run; a pause keeps them off the next candidate
SETTLE_S = 0.05


def median_s(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``repeat`` calls of ``fn`` after ``warmup`` calls, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """`median_s` in milliseconds."""
    return median_s(fn, repeat, warmup) * 1e3


def settled_median_ms(fn: Callable[[], object], repeat: int, settle_s: float = SETTLE_S) -> float:
    """`median_ms` after a pause of ``settle_s``, for candidates run back to back."""
    time.sleep(settle_s)
    return median_ms(fn, repeat)


def round_robin(
    calls: dict[str, Sequence[Callable[[], object]]], rounds: int, repeat: int
) -> dict[str, list[float]]:
    """Per candidate, the median over ``rounds`` round-robin rounds of each of its calls'
    median seconds (``repeat`` calls each): ``{name: [seconds of call 0, call 1, ...]}``."""
    for candidate in calls.values():
        for call in candidate:  # warm-up: first runs allocate and prepack
            call()
    timed: dict[str, list[list[float]]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, candidate in calls.items():
            time.sleep(SETTLE_S)
            timed[name].append([median_s(call, repeat) for call in candidate])
    return {
        name: [statistics.median(r[i] for r in per_round) for i in range(len(calls[name]))]
        for name, per_round in timed.items()
    }


def relative_times(per_size: dict[str, list[float]]) -> dict[str, float]:
    """Seconds per size of each candidate -> its time relative to the fastest, as the geometric
    mean over the sizes (1.0: fastest at every size; each size weighs alike)."""
    sizes = len(next(iter(per_size.values())))
    best = [min(times[i] for times in per_size.values()) for i in range(sizes)]
    return {
        name: math.exp(sum(math.log(t / b) for t, b in zip(times, best, strict=True)) / sizes)
        for name, times in per_size.items()
    }


def cpu_model() -> str:
    """The host's CPU model name (timings are comparable only on the same one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
