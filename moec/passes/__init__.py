"""Passes over captured programs, one per file, run in order by a `PassManager`."""

from __future__ import annotations

import numpy as np

from moec.compression_options import (
    DISTILL_INITS,
    DISTILL_TRAIN,
    MERGE_METHODS,
    PRUNE_METHODS,
    DistillOptions,
)
from moec.errors import MoecError
from moec.passes.capacity import CALIBRATION_SCHEDULE, CapacityPass, check_capacity
from moec.passes.distill_dense import DistillDensePass
from moec.passes.grouped_gemm import GroupedGemmPass
from moec.passes.merge_experts import MergeExpertsPass
from moec.passes.pass_base import Pass, PassManager, PassResult
from moec.passes.prune_experts import PruneExpertsPass
from moec.passes.select_lowering import SelectLoweringPass, check_lowering

__all__ = [
    "CALIBRATION_SCHEDULE",
    "DISTILL_INITS",
    "DISTILL_TRAIN",
    "MERGE_METHODS",
    "PRUNE_METHODS",
    "CapacityPass",
    "DistillDensePass",
    "DistillOptions",
    "GroupedGemmPass",
    "MergeExpertsPass",
    "Pass",
    "PassManager",
    "PassResult",
    "PruneExpertsPass",
    "SelectLoweringPass",
    "check_capacity",
    "check_lowering",
    "default_passes",
    "lossy_passes",
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


def lossy_passes(
    merge_experts: float | int | None = None,
    merge_method: str = "hc",
    merge_lstsq: bool = False,
    prune_experts: float | int | None = None,
    prune_method: str = "frequency",
    distill: DistillOptions | None = None,
) -> list[Pass]:
    """The lossy passes asked for, in the order they run: merge, prune, distil (``distill``:
    how, or None for no distillation)."""
    passes: list[Pass] = []
    if merge_experts is not None:
        passes.append(MergeExpertsPass(merge_experts, merge_method, merge_lstsq))
    if prune_experts is not None:
        passes.append(PruneExpertsPass(prune_experts, prune_method))
    if distill is not None:
        passes.append(DistillDensePass(distill))
    return passes
