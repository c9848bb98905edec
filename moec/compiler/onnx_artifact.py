"""The files of an ONNX target's artifact: the lowered graph and its weights as external data."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from moec.compiler.lower_onnx import lower_to_onnx
from moec.ir.program import CapturedProgram
from moec.ir.signature import TensorSpec
from moec.registry import Target

__all__ = ["SHARD_BYTES", "write_onnx"]

SHARD_BYTES = 4 << 30  # external data is cut into files of at most this (bar one huge tensor)


def write_onnx(program: CapturedProgram, directory: Path, target: Target) -> dict[str, str]:
    """Lower ``program`` and save it as ``target.files``' model and weights (role -> file;
    weights over `SHARD_BYTES` in several files). ``target.options``: ``standard_ops_only``,
    refuse contrib ops (portable ONNX); ``onnx_rewrite``, a hook that edits the graph last."""
    options = target.options
    model = lower_to_onnx(
        program, options.get("standard_ops_only", False), options.get("onnx_rewrite")
    )
    _name_dims(model, program.inputs + program.outputs)
    model_file, weights_file = target.files["model"], target.files["weights"]
    before = set(os.listdir(directory))
    ir.save(
        model, directory / model_file, external_data=weights_file, max_shard_size_bytes=SHARD_BYTES
    )
    written = sorted(set(os.listdir(directory)) - before - {model_file})
    files = {"model": model_file}
    for i, name in enumerate(written):  # one file, or shards: weights, weights.2, ...
        files["weights" if i == 0 else f"weights.{i + 1}"] = name
    return files


def _name_dims(model: ir.Model, specs: list[TensorSpec]) -> None:
    """The graph's dynamic dims named as the manifest names them (``batch``,
    ``sequence_length``), not by the exporter's symbols (``s21``): on its inputs and outputs,
    and on every value inside that has the same symbol (so shape inference, and a checker
    reading it, can tell a value's size from the inputs')."""
    by_name = {spec.name: spec for spec in specs}
    symbols: dict[str, str] = {}
    for value in (*model.graph.inputs, *model.graph.outputs):
        spec = by_name.get(value.name)
        if spec is None or value.shape is None or len(value.shape) != spec.rank:
            continue
        for old, new in zip(value.shape, spec.shape, strict=True):
            if isinstance(old, ir.SymbolicDim) and old.value and not isinstance(new, int):
                symbols.setdefault(old.value, new.name)
        value.shape = ir.Shape(
            [d if isinstance(d, int) else ir.SymbolicDim(d.name) for d in spec.shape]
        )
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.shape is None or value.is_graph_output():
                continue
            dims = [_renamed(d, symbols) for d in value.shape]
            if dims != list(value.shape):
                value.shape = ir.Shape(dims)


def _renamed(dim, symbols: dict[str, str]):
    if isinstance(dim, ir.SymbolicDim) and dim.value in symbols:
        return ir.SymbolicDim(symbols[dim.value])
    return dim
