"""Experts side by side: at many rows per expert, each of the process's threads runs whole
experts on single-threaded GEMMs, instead of every expert's GEMMs being split over all threads.

`run_side_by_side(tasks, threads)` runs ``(rows, fn)`` tasks on ``threads`` workers, the tasks
dealt out by rows (largest first, each to the least loaded worker), and returns their results
in task order. `side_by_side(row_counts, threads)` says when that is the faster way here.

Why: a GEMM on a few rows split over the threads keeps them all busy; on many rows each
thread's own expert avoids the split's synchronisation and keeps its part of the work in its
own cache (the crossover, `MIN_ROWS_PER_EXPERT`, is measured in docs/performance.md). The
outputs match the threaded GEMMs' bit for bit.

Each worker is made single-threaded once, when its pool is built: ``torch.set_num_threads``
in a thread is that thread's own for OpenMP and MKL, but torch sets a thread's count from the
process default on its first parallel call, so the worker makes that call first (otherwise its
elementwise ops ran on two threads). The call also sets the default that threads started later
begin with, so the caller's count is set back right after.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["MIN_ROWS_PER_EXPERT", "run_side_by_side", "side_by_side"]

MIN_ROWS_PER_EXPERT = 96  # mean rows per active expert from which side by side is faster


def side_by_side(row_counts: Sequence[int], threads: int) -> bool:
    """Whether experts with these row counts (the active ones) run faster side by side."""
    return (
        threads > 1
        and len(row_counts) >= threads
        and sum(row_counts) >= MIN_ROWS_PER_EXPERT * len(row_counts)
    )


def run_side_by_side(tasks: Sequence[tuple[int, Callable[[], torch.Tensor]]], threads: int):
    """``[fn() for rows, fn in tasks]``, computed on ``threads`` single-threaded workers."""
    bins: list[list[int]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for i in sorted(range(len(tasks)), key=lambda i: -tasks[i][0]):
        least = loads.index(min(loads))
        bins[least].append(i)
        loads[least] += tasks[i][0]

    def run(indices: list[int]) -> list[tuple[int, torch.Tensor]]:
        with torch.no_grad():  # grad mode is per thread: the caller's does not reach here
            return [(i, tasks[i][1]()) for i in indices]

    results: list = [None] * len(tasks)
    for future in [_pool(threads).submit(run, b) for b in bins if b]:
        for i, value in future.result():
            results[i] = value
    return results


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """``threads`` workers, each single-threaded for torch (see the module docstring)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="moec-experts")
    caller = torch.get_num_threads()
    started = threading.Barrier(threads)  # holds each worker until all have taken one call

    def single_threaded():
        torch.get_num_threads()  # first: a thread's first parallel call resets its count
        torch.set_num_threads(1)
        started.wait()

    for future in [pool.submit(single_threaded) for _ in range(threads)]:
        future.result()
    torch.set_num_threads(caller)
    return pool
