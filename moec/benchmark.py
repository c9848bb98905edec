"""``moec bench OUT``: latency of an artifact against the eager model it came from.

For each input shape (the dynamic dims take the values of ``schedule``), the artifact and the
eager source run on the same seeded inputs in paired rounds: each round times the eager model
and then the artifact (the median of ``repeat`` calls each), so a burst of load on a shared host
falls on both. A row reports the median over its rounds and the spread of the per-round
speed-ups; rounds whose speed-ups differ by more than `DISAGREEMENT` make it unreliable.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moec.runtime.arrays import to_torch
from moec.runtime.inputs import dim_values, make_inputs
from moec.runtime.load import load
from moec.runtime.manifest import Manifest
from moec.timing import cpu_model, median_ms
from moec.verification import eager_input, eager_model

__all__ = ["BENCH_SCHEDULE", "DISAGREEMENT", "BenchReport", "BenchRow", "bench_artifact"]

BENCH_SCHEDULE = ((1, 1), (1, 16), (1, 512))
DISAGREEMENT = 1.5  # largest over smallest per-round speed-up beyond which a row is unreliable


@dataclass
class BenchRow:
    dims: dict[str, int]  # the dynamic dims' sizes
    eager_ms: list[float]  # per round
    artifact_ms: list[float]

    @property
    def dims_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())

    @property
    def speedups(self) -> list[float]:
        return [e / a for e, a in zip(self.eager_ms, self.artifact_ms, strict=True)]

    @property
    def speedup(self) -> float:
        return statistics.median(self.speedups)

    @property
    def unreliable(self) -> bool:
        return max(self.speedups) > DISAGREEMENT * min(self.speedups)


@dataclass
class BenchReport:
    rows: list[BenchRow] = field(default_factory=list)
    host: dict[str, str] = field(default_factory=dict)  # cpu, threads, provider

    @property
    def warnings(self) -> list[str]:
        return [
            f"{r.dims_str}: the rounds disagree "
            f"(speed-up {min(r.speedups):.2f}x to {max(r.speedups):.2f}x); the host is "
            "probably busy: run again on a quiet one, or with more --rounds"
            for r in self.rows
            if r.unreliable
        ]


def bench_artifact(
    path: str | Path,
    *,
    source: str | nn.Module | None = None,
    schedule=BENCH_SCHEDULE,
    repeat: int = 7,
    rounds: int = 5,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    trust_source: bool = False,
) -> BenchReport:
    manifest = Manifest.read(path)
    trust = {"trust_pickle": trust_pickle, "trust_remote_code": trust_remote_code}
    model = eager_model(manifest, source, **trust, trust_source=trust_source)
    report = BenchReport()
    with load(path, trust_pickle=trust_pickle) as runner:
        report.host = _host(runner)
        for feeds in make_inputs(manifest.inputs, schedule, seed=0):
            args = [eager_input(model, to_torch(feeds[s.name])) for s in manifest.inputs]
            row = BenchRow(dim_values(manifest.inputs, feeds), [], [])
            with torch.no_grad():
                for _ in range(rounds):
                    row.eager_ms.append(median_ms(lambda args=args: model(*args), repeat))
                    row.artifact_ms.append(median_ms(lambda f=feeds: runner.infer(f), repeat))
            report.rows.append(row)
    return report


def _host(runner) -> dict[str, str]:
    """What the timings depend on: the CPU, the threads each side ran with, the provider."""
    session = getattr(runner, "session", None)
    if session is not None:
        provider = session.get_providers()[0]
        threads = session.get_session_options().intra_op_num_threads or os.cpu_count()
    else:
        provider = str(getattr(runner, "device", "cpu"))
        threads = torch.get_num_threads()
    return {
        "cpu": cpu_model(),
        "provider": provider,
        "artifact threads": str(threads),
        "eager threads": str(torch.get_num_threads()),
    }
