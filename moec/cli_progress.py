"""What ``moec compile`` shows while it works: a rich progress line on a terminal; in a pipe or
a CI log, where that shows nothing until the end, a plain line per stage and per tenth of
distillation."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["StageProgress"]


class StageProgress:
    """``with StageProgress(console, stages) as p: p.stage(name); p.step(i, n)``."""

    def __init__(self, console: Console, stages: list[str]):
        self.console, self.stages = console, stages
        self.progress: Progress | None = None
        self.start = time.perf_counter()

    def __enter__(self) -> StageProgress:
        if self.console.is_terminal:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
            self.progress = Progress(*columns, console=self.console, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("starting", total=len(self.stages))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def stage(self, name: str) -> None:
        done = self.stages.index(name)
        self._show(f"[{done + 1}/{len(self.stages)}] {name}", completed=done)

    def step(self, step: int, steps: int) -> None:
        if self.progress is None and step != steps and step % max(1, steps // 10):
            return
        done = self.stages.index("compress")
        self._show(f"[{done + 1}/{len(self.stages)}] distil {step}/{steps}")

    def _show(self, what: str, completed: int | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=what, completed=completed)
        else:
            elapsed = time.perf_counter() - self.start
            self.console.print(f"{what} ({elapsed:.1f} s)", highlight=False, markup=False)
