"""Clamp bounds of one Python type before ONNX export.

torch.onnx (2.13) cannot translate ``aten.clamp(x, 0.001953125, 448)``, a float lower bound and
an int upper one (Kolibri 1.1's NVFP4 rounding writes ``clamp(2**-9, 448)``): its type
promotion turns one bound into a tensor, and no clamp overload takes a scalar with a tensor.
On a floating tensor both bounds are floats anyway; the rewrite makes them so.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

__all__ = ["clamp_bounds_as_floats"]


def clamp_bounds_as_floats(program: ExportedProgram) -> int:
    """Make int bounds of ``program``'s floating clamps floats, in place; how many clamps."""
    rewritten = 0
    for node in program.graph_module.graph.nodes:
        if node.target is not torch.ops.aten.clamp.default or len(node.args) < 3:
            continue
        value = node.args[0].meta.get("val")
        bounds = node.args[1:3]
        mixed = {type(b) for b in bounds} == {int, float}
        if mixed and isinstance(value, torch.Tensor) and value.is_floating_point():
            node.args = (node.args[0], *(float(b) for b in bounds), *node.args[3:])
            rewritten += 1
    return rewritten
