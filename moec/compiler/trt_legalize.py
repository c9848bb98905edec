"""Rewrite a portable ONNX graph into the forms TensorRT's parser takes, without changing what
it computes (the ``trt`` target's ``onnx_rewrite``).

- ``TopK(sorted=0)`` -> ``sorted=1``: an unsorted top-k may come in any order, sorted is one
  of them (the families' group-limited routers ask for unsorted ones).
- ``ScatterElements``, ``ScatterND`` and ``Equal`` on booleans, which TensorRT's take only as
  numbers: their boolean inputs are cast to int32 and a scatter's output back to bool.
- ``NonZero`` of booleans or integers (TensorRT's takes floats): of the input cast to float32,
  which is zero exactly where the input is.
- ``Clip`` of integers (TensorRT's takes floats): ``Max`` then ``Min``, exact.
- ``CumSum`` of integers (TensorRT's takes floats): in float32 and cast back, exact while every
  partial sum stays below 2^24 in magnitude (the positions and mask counts the families sum).

By the types torch.onnx records on every value; `check_trt` catches what they leave out.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["legalize_for_tensorrt"]

INTEGERS = (ir.DataType.INT64, ir.DataType.INT32)
NUMBERS_ONLY = {  # op -> the inputs that carry its data (TensorRT's types have no bool there)
    "ScatterElements": (0, 2),
    "ScatterND": (0, 2),
    "Equal": (0, 1),
}


def legalize_for_tensorrt(model: ir.Model) -> None:
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "TopK" and node.attributes.get_int("sorted", 1) == 0:
            node.attributes["sorted"] = ir.AttrInt64("sorted", 1)
        elif node.op_type in NUMBERS_ONLY:
            _as_int32(node, NUMBERS_ONLY[node.op_type])
        elif node.op_type == "NonZero" and _dtype(node, 0) in (ir.DataType.BOOL, *INTEGERS):
            node.replace_input_with(0, _cast(node, node.inputs[0], ir.DataType.FLOAT))
        elif node.op_type == "Clip" and _dtype(node, 0) in INTEGERS:
            _clip_as_max_min(node)
        elif node.op_type == "CumSum" and _dtype(node, 0) in INTEGERS:
            kind = node.inputs[0].dtype
            node.replace_input_with(0, _cast(node, node.inputs[0], ir.DataType.FLOAT))
            _cast_output(node, kind)


def _dtype(node: ir.Node, index: int):
    value = node.inputs[index] if index < len(node.inputs) else None
    return None if value is None else value.dtype


def _cast(node: ir.Node, value: ir.Value, to: ir.DataType) -> ir.Value:
    """``value`` cast to ``to`` by a node inserted before ``node``."""
    cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", to)])
    cast.outputs[0].dtype, cast.outputs[0].shape = to, value.shape
    node.graph.insert_before(node, cast)
    return cast.outputs[0]


def _clip_as_max_min(node: ir.Node) -> None:
    """Replace ``Clip(x, low, high)`` by ``Min(Max(x, low), high)`` (absent bounds left out)."""
    value = node.inputs[0]
    for op_type, bound in (("Max", 1), ("Min", 2)):
        if bound < len(node.inputs) and node.inputs[bound] is not None:
            step = ir.Node("", op_type, [value, node.inputs[bound]])
            step.outputs[0].dtype, step.outputs[0].shape = value.dtype, value.shape
            node.graph.insert_before(node, step)
            value = step.outputs[0]
    identity = ir.Node("", "Identity", [value])
    node.graph.insert_before(node, identity)
    _replace_output(node.outputs[0], identity.outputs[0])
    node.graph.remove(node, safe=True)


def _as_int32(node: ir.Node, data: tuple[int, ...]) -> None:
    """Cast ``node``'s boolean data inputs to int32 (and a scatter's output back to bool)."""
    inputs = [node.inputs[i] if i < len(node.inputs) else None for i in data]
    if not inputs or any(v is None or v.dtype != ir.DataType.BOOL for v in inputs):
        return
    for i in data:
        node.replace_input_with(i, _cast(node, node.inputs[i], ir.DataType.INT32))
    if node.op_type != "Equal":
        _cast_output(node, ir.DataType.BOOL)


def _cast_output(node: ir.Node, to: ir.DataType) -> None:
    """Cast ``node``'s output to ``to`` for its users (and the graph, under its name)."""
    out = node.outputs[0]
    back = ir.Node("", "Cast", [out], [ir.AttrInt64("to", to)])
    back.outputs[0].dtype, back.outputs[0].shape = to, out.shape
    node.graph.insert_after(node, back)
    out.dtype = node.inputs[0].dtype
    _replace_output(out, back.outputs[0])
    back.replace_input_with(0, out)  # `_replace_output` rewired the cast's own input too


def _replace_output(old: ir.Value, new: ir.Value) -> None:
    """``new`` where ``old`` was used, and in its place among the graph's outputs (by name)."""
    name, was_output = old.name, old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        old.name = f"{name}_before"
        new.name = name
