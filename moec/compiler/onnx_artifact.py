"""The files of an ONNX target's artifact: the lowered graph and its weights as external data."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from moec.compiler.lower_onnx import lower_to_onnx
from moec.ir.program import CapturedProgram
from moec.registry import Target

__all__ = ["write_onnx"]


def write_onnx(program: CapturedProgram, directory: Path, target: Target) -> dict[str, str]:
    """Lower ``program`` and save it as ``target.files``' model and weights (role -> file).
    ``target.options["standard_ops_only"]``: refuse contrib ops (portable ONNX)."""
    model = lower_to_onnx(program, target.options.get("standard_ops_only", False))
    model_file, weights_file = target.files["model"], target.files["weights"]
    ir.save(model, directory / model_file, external_data=weights_file)
    files = {"model": model_file}
    if (directory / weights_file).exists():
        files["weights"] = weights_file
    return files
