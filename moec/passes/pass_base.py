"""Pass infrastructure: a pass is a small class with ``call(program) -> PassResult``; a
`PassManager` runs a list of them in order (the order is data: ``moec compile --list-passes``)."""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moec.compiler.capture import CapturedProgram

__all__ = ["Pass", "PassManager", "PassResult"]

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass returns: the program, whether it changed, and a JSON-able report."""

    program: CapturedProgram
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


class Pass(abc.ABC):
    """One transformation of a captured program.

    ``lossy`` passes change the model's numbers and must write a quality report; they only
    run when asked for.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    lossy: ClassVar[bool] = False

    @abc.abstractmethod
    def call(self, program: CapturedProgram) -> PassResult:
        """Transform ``program`` (in place or not) and say what changed."""

    def __call__(self, program: CapturedProgram) -> PassResult:
        result = self.call(program)
        if self.lossy and result.modified and not result.report:
            raise RuntimeError(f"lossy pass {self.name} changed the model without a report")
        return result


class PassManager:
    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def run(self, program: CapturedProgram) -> tuple[CapturedProgram, list[dict[str, Any]]]:
        """Run every pass in order; returns the program and one record per pass."""
        records = []
        for p in self.passes:
            start = time.perf_counter()
            result = p(program)
            program = result.program
            records.append(
                {
                    "name": p.name,
                    "lossy": p.lossy,
                    "modified": result.modified,
                    "seconds": round(time.perf_counter() - start, 4),
                    "report": result.report,
                }
            )
            log.info("pass %s: modified=%s", p.name, result.modified)
        return program, records
