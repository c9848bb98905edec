"""``moec bench OUT``: latency of an artifact against the eager model it came from.

For each input shape (the dynamic dims take the values of ``schedule``), the artifact and the
eager source run on the same seeded inputs: warm-up, then the median of ``repeat`` runs each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moec.runtime.arrays import to_torch
from moec.runtime.inputs import make_inputs
from moec.runtime.load import load
from moec.runtime.manifest import Manifest
from moec.timing import median_ms
from moec.verification import eager_input, eager_model

__all__ = ["BENCH_SCHEDULE", "BenchRow", "bench_artifact"]

BENCH_SCHEDULE = ((1, 1), (1, 16), (1, 512))


@dataclass
class BenchRow:
    shapes: dict[str, list[int]]
    eager_ms: float
    artifact_ms: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.artifact_ms


def bench_artifact(
    path: str | Path,
    *,
    source: str | nn.Module | None = None,
    schedule=BENCH_SCHEDULE,
    repeat: int = 7,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    trust_source: bool = False,
) -> list[BenchRow]:
    manifest = Manifest.read(path)
    trust = {"trust_pickle": trust_pickle, "trust_remote_code": trust_remote_code}
    model = eager_model(manifest, source, **trust, trust_source=trust_source)
    rows = []
    with load(path, trust_pickle=trust_pickle) as runner:
        for feeds in make_inputs(manifest.inputs, schedule, seed=0):
            args = [eager_input(model, to_torch(feeds[s.name])) for s in manifest.inputs]
            with torch.no_grad():
                eager_ms = median_ms(lambda args=args: model(*args), repeat)
            artifact_ms = median_ms(lambda feeds=feeds: runner.infer(feeds), repeat)
            rows.append(
                BenchRow({k: list(v.shape) for k, v in feeds.items()}, eager_ms, artifact_ms)
            )
    return rows
