"""The files of an ONNX target's artifact: the lowered graph and its weights as external data."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from moec.compiler.lower_onnx import lower_to_onnx
from moec.ir.program import CapturedProgram
from moec.ir.signature import TensorSpec
from moec.registry import Target

__all__ = ["write_onnx"]


def write_onnx(program: CapturedProgram, directory: Path, target: Target) -> dict[str, str]:
    """Lower ``program`` and save it as ``target.files``' model and weights (role -> file).
    ``target.options["standard_ops_only"]``: refuse contrib ops (portable ONNX)."""
    model = lower_to_onnx(program, target.options.get("standard_ops_only", False))
    _name_dims(model, program.inputs + program.outputs)
    model_file, weights_file = target.files["model"], target.files["weights"]
    ir.save(model, directory / model_file, external_data=weights_file)
    files = {"model": model_file}
    if (directory / weights_file).exists():
        files["weights"] = weights_file
    return files


def _name_dims(model: ir.Model, specs: list[TensorSpec]) -> None:
    """The graph's inputs and outputs with their dynamic dims named as the manifest names them
    (``batch``, ``sequence_length``), not by the exporter's symbols (``s21``)."""
    by_name = {spec.name: spec for spec in specs}
    for value in (*model.graph.inputs, *model.graph.outputs):
        spec = by_name.get(value.name)
        if spec is None or value.shape is None or len(value.shape) != spec.rank:
            continue
        value.shape = ir.Shape(
            [d if isinstance(d, int) else ir.SymbolicDim(d.name) for d in spec.shape]
        )
