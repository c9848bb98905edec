"""Pass infrastructure (after onnx-ir's passes): a pass is a small class with
``call(program) -> PassResult``, generic over the program type it takes; a `PassManager` runs
a list of them in order (the order is data: ``moec compile --list-passes``).

Each pass declares whether it changes its input in place, and the base class holds it to that
promise. After every pass the manager runs the program's IR check (``program.problems()``:
`CapturedProgram.problems`, `CompressionState.problems`) and, when it finds something, raises
`PassError` naming the pass that broke it.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from moec.errors import PassError

__all__ = ["CheckedProgram", "Pass", "PassManager", "PassResult"]

log = logging.getLogger(__name__)


class CheckedProgram(Protocol):
    """What a pass manager runs passes over: anything with an IR check."""

    def problems(self) -> list[str]: ...


P = TypeVar("P", bound=CheckedProgram)


@dataclass
class PassResult(Generic[P]):
    """What a pass returns: the program, whether it changed, and a JSON-able report."""

    program: P
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


class Pass(abc.ABC, Generic[P]):
    """One transformation of a program of type ``P``.

    ``in_place`` passes change their input and return it; the others return a new program and
    leave their input as it was. ``lossy`` passes change the model's numbers and must write a
    quality report; they only run when asked for.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    in_place: ClassVar[bool] = True
    lossy: ClassVar[bool] = False

    @abc.abstractmethod
    def call(self, program: P) -> PassResult[P]:
        """Transform ``program`` and say what changed."""

    def __call__(self, program: P) -> PassResult[P]:
        result = self.call(program)
        if self.in_place and result.program is not program:
            raise PassError(f"pass {self.name} is declared in place but returned a new program")
        if not self.in_place and result.program is program:
            raise PassError(f"pass {self.name} is declared not in place but returned its input")
        if self.lossy and result.modified and not result.report:
            raise PassError(f"lossy pass {self.name} changed the model without a report")
        return result


class PassManager(Generic[P]):
    """Runs ``passes`` in order, checking the IR after each."""

    def __init__(self, passes: list[Pass[P]]):
        self.passes = list(passes)

    def run(self, program: P) -> tuple[P, list[dict[str, Any]]]:
        """Run every pass in order; returns the program and one record per pass."""
        records = []
        for p in self.passes:
            result = p(program)
            program = result.program
            problems = program.problems()
            if problems:
                raise PassError(
                    f"pass {p.name} left the program inconsistent: {'; '.join(problems[:5])}"
                )
            records.append(
                {
                    "name": p.name,
                    "lossy": p.lossy,
                    "modified": result.modified,
                    "report": result.report,
                }
            )
            log.info("pass %s: modified=%s", p.name, result.modified)
        return program, records
