"""Passes, one per file, typed over the program they take (`CapturedProgram` after capture,
`CompressionState` for the lossy passes before it), run in order by a `PassManager`."""

from __future__ import annotations

import numpy as np

from moec.passes.capacity import CALIBRATION_SCHEDULE, CapacityPass
from moec.passes.distill_dense import DistillDensePass
from moec.passes.grouped_gemm import GroupedGemmPass
from moec.passes.merge_experts import MergeExpertsPass
from moec.passes.pass_base import Pass, PassManager, PassResult
from moec.passes.prune_experts import PruneExpertsPass
from moec.passes.quantize_experts import QuantizeExpertsPass
from moec.passes.select_lowering import SelectLoweringPass
from moec.settings import CompileSettings

__all__ = [
    "CALIBRATION_SCHEDULE",
    "CapacityPass",
    "DistillDensePass",
    "GroupedGemmPass",
    "MergeExpertsPass",
    "Pass",
    "PassManager",
    "PassResult",
    "PruneExpertsPass",
    "QuantizeExpertsPass",
    "SelectLoweringPass",
    "default_passes",
    "lossy_passes",
]


def default_passes(
    settings: CompileSettings, calibration: list[dict[str, np.ndarray]] | None = None
) -> list[Pass]:
    """The passes ``moec compile`` runs after capture for ``settings``.

    Default: ``grouped-gemm`` (the target's default rule, or timing with ``autotune``).
    ``settings.lowering`` forces one lowering on every block (``select-lowering``);
    ``settings.capacity`` (a factor or ``"auto"``, implied by ``lowering="capacity"``) runs the
    ``capacity`` pass on ``calibration`` inputs.
    """
    if settings.wants_capacity:
        return [CapacityPass(settings.target, settings.capacity or "auto", calibration or [])]
    if settings.lowering is not None:
        return [SelectLoweringPass(settings.lowering)]
    return [GroupedGemmPass(settings.target, settings.autotune)]


def lossy_passes(settings: CompileSettings) -> list[Pass]:
    """The lossy passes ``settings`` asks for, in the order they run: merge, prune, distil,
    quantise."""
    passes: list[Pass] = []
    if settings.merge is not None:
        m = settings.merge
        passes.append(MergeExpertsPass(m.keep, m.method, m.lstsq))
    if settings.prune is not None:
        passes.append(PruneExpertsPass(settings.prune.keep, settings.prune.method))
    if settings.distill is not None:
        passes.append(DistillDensePass(settings.distill))
    if settings.quantize is not None:
        passes.append(QuantizeExpertsPass(settings.quantize))
    return passes
