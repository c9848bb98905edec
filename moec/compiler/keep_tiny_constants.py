"""Scalar constants near an identity, kept from onnxscript's no-op rules.

onnxscript's optimizer rewrites ``x + c`` to ``x`` for a scalar c within 1e-8 of 0, and ``x * c``
to ``x`` for c within a relative 1e-5 of 1 (docs/upstream/onnxscript-add-tiny-constant.md): an
RMS norm's ``eps = 1e-12`` is dropped, and a zero row (a pad token's embedding) normalises to
NaN. The rules match rank-0 constants only, so each such operand (a Constant, or one through a
Cast or CastLike) is unsqueezed to one element, 1-D, where the other operand has rank >= 1 (the
broadcast result is the same); folding makes it a 1-D constant. Runs on the exporter's graph,
before the optimizer.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

__all__ = ["keep_tiny_constants"]

IDENTITY = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}  # op -> the constant it ignores
REL_TOL, ABS_TOL = 1e-5, 1e-8  # the rules' tolerances (onnxscript's pattern Constant)


def keep_tiny_constants(model: ir.Model) -> int:
    """Make the scalar operands an optimizer would take for an identity 1-D; how many."""
    kept = 0
    for node in list(model.graph):
        identity = IDENTITY.get(node.op_type)
        if identity is None or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        for i, value in enumerate(node.inputs):
            other = node.inputs[1 - i]
            c = _scalar_constant(value)
            if c is None or other is None or other.shape is None or other.shape.rank() < 1:
                continue
            if c != identity and math.isclose(c, identity, rel_tol=REL_TOL, abs_tol=ABS_TOL):
                axes = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([0]))})
                one_d = ir.node("Unsqueeze", [value, axes.outputs[0]])
                model.graph.insert_before(node, [axes, one_d])
                node.replace_input_with(i, one_d.outputs[0])
                kept += 1
    return kept


def _scalar_constant(value: ir.Value | None) -> float | None:
    """The number a rank-0 ``value`` holds: a Constant's, itself or through a Cast or CastLike."""
    node = None if value is None else value.producer()
    if node is not None and node.op_type in ("Cast", "CastLike") and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Constant" or "value" not in node.attributes:
        return None
    array = node.attributes["value"].value.numpy()
    return float(array) if array.ndim == 0 and array.dtype.kind == "f" else None
