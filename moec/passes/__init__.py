"""Passes over captured programs, one per file, run in order by a `PassManager`."""

from __future__ import annotations

import numpy as np

from moec.errors import MoecError
from moec.passes.capacity import CALIBRATION_SCHEDULE, CapacityPass, check_capacity
from moec.passes.grouped_gemm import GroupedGemmPass
from moec.passes.pass_base import Pass, PassManager, PassResult
from moec.passes.select_lowering import SelectLoweringPass, check_lowering

__all__ = [
    "CALIBRATION_SCHEDULE",
    "CapacityPass",
    "GroupedGemmPass",
    "Pass",
    "PassManager",
    "PassResult",
    "SelectLoweringPass",
    "check_capacity",
    "check_lowering",
    "default_passes",
]


def default_passes(
    target: str,
    lowering: str | None = None,
    capacity: float | str | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> list[Pass]:
    """The pipeline ``moec compile`` runs for ``target``.

    Default: ``grouped-gemm`` (the exact, fastest lowering per target). ``lowering`` forces one
    lowering on every block (``select-lowering``); ``capacity`` (a factor or ``"auto"``, implied
    by ``lowering="capacity"``) runs the ``capacity`` pass on ``calibration`` inputs.
    """
    if lowering == "capacity" and capacity is None:
        capacity = "auto"
    if capacity is not None:
        if lowering not in (None, "capacity"):
            check_lowering(target, lowering)
            raise MoecError(
                f"--capacity-factor/--capacity choose the capacity lowering; they cannot be "
                f"combined with --lowering {lowering}"
            )
        return [CapacityPass(target, capacity, calibration or [])]
    if lowering is not None:
        return [SelectLoweringPass(target, lowering)]
    return [GroupedGemmPass(target)]
