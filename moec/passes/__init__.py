"""Passes over captured programs, one per file, run in order by a `PassManager`."""

from __future__ import annotations

from moec.passes.pass_base import Pass, PassManager, PassResult
from moec.passes.select_lowering import SelectLoweringPass

__all__ = ["Pass", "PassManager", "PassResult", "SelectLoweringPass", "default_passes"]


def default_passes(target: str) -> list[Pass]:
    """The pipeline ``moec compile`` runs for ``target`` when no pass is asked for."""
    return [SelectLoweringPass(target)]
