"""Dequantise after the layout ops: ``Transpose``, ``Gather`` and ``Concat`` of
``DequantizeLinear`` outputs become the same ops on their codes, scales and zero points, then
one dequantisation.

The emitters take each block's weights as float values and rearrange them (one expert's slice,
a transpose): on dequantised weights those ops would run at every call, on float copies. Moved
before the dequantisation they act on initializers, which the optimizer folds, so the graph
dequantises the stored layout directly. Both ops commute with a blocked dequantisation when
they leave the block axis whole (a ``Gather`` on another axis; any transpose, the axis moving
with it; a ``Concat`` of parts dequantised alike). ONNX Runtime then fuses a dequantisation that
feeds a ``MatMul`` into ``MatMulNBits``. Runs on the exporter's graph, before the optimizer.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["dequantize_late"]

RANK = "moec.rank"  # a moved dequantisation's rank, where its inputs have no shape yet


def dequantize_late(model: ir.Model) -> int:
    """Move layout ops before the dequantisations they follow; how many were moved."""
    moved = 0
    changed = True
    while changed:
        changed = False
        for node in list(model.graph):
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            for user, _ in list(node.outputs[0].uses()):
                if _move(model.graph, node, user):
                    moved += 1
                    changed = True
    return moved


def _axis(node: ir.Node, name: str, default: int, rank: int) -> int:
    attr = node.attributes.get(name)
    value = default if attr is None else attr.as_int()
    return value + rank if value < 0 else value


def _move(graph: ir.Graph, dq: ir.Node, user: ir.Node) -> bool:
    """Replace ``user`` (a Transpose, Gather or Concat of ``dq``'s output) by a dequantisation
    of the same op on ``dq``'s inputs; False where it does not commute. Only blocked
    dequantisations move (their scales have the codes' rank; a per-axis scale is 1-D)."""
    shape = dq.inputs[1].shape  # the scale's: an initializer, where the codes went through casts
    rank = dq.meta.get(RANK, None if shape is None else shape.rank())
    if "block_size" not in dq.attributes or rank is None or user.domain not in ("", "ai.onnx"):
        return False
    if user.inputs[0] is not dq.outputs[0]:
        return False
    axis = _axis(dq, "axis", 1, rank)
    if user.op_type == "Transpose":
        perm_attr = user.attributes.get("perm")
        perm = list(range(rank))[::-1] if perm_attr is None else list(perm_attr.as_ints())

        def apply(value: ir.Value) -> ir.Node:
            return ir.node("Transpose", [value], attributes={"perm": perm})

        new_axis = perm.index(axis)
    elif user.op_type == "Gather":
        indices = user.inputs[1]
        along = _axis(user, "axis", 0, rank)
        index_rank = _rank(indices)
        if along == axis or index_rank is None:
            return False

        def apply(value: ir.Value) -> ir.Node:
            return ir.node("Gather", [value, indices], attributes={"axis": along})

        new_axis = axis + index_rank - 1 if along < axis else axis
        rank += index_rank - 1
    elif user.op_type == "Concat":
        return _concat(graph, user, rank)
    else:
        return False
    moved = [apply(v) if v is not None else None for v in dq.inputs]
    new_inputs = [None if n is None else n.outputs[0] for n in moved]
    attributes = {k: v for k, v in dq.attributes.items() if k != "axis"}
    new_dq = ir.node(
        "DequantizeLinear",
        new_inputs,
        attributes={**{k: a.value for k, a in attributes.items()}, "axis": new_axis},
        version=dq.version,
    )
    new_dq.meta[RANK] = rank
    graph.insert_before(user, [n for n in moved if n is not None] + [new_dq])
    new_dq.outputs[0].shape = user.outputs[0].shape
    new_dq.outputs[0].type = user.outputs[0].type
    ir.convenience.replace_all_uses_with(user.outputs[0], new_dq.outputs[0])
    graph.remove(user, safe=True)
    return True


def _concat(graph: ir.Graph, user: ir.Node, rank: int) -> bool:
    """A Concat of dequantisations of the same kind (axis, block size, zero points) as one
    dequantisation of the concatenated codes, scales and zero points (each part's blocks stay
    whole: a part's length along the block axis is a whole number of blocks)."""
    parts = [None if v is None else v.producer() for v in user.inputs]
    dequantizations = (getattr(p, "op_type", None) == "DequantizeLinear" for p in parts)
    if not all(dequantizations) or any("block_size" not in p.attributes for p in parts):
        return False

    def kind(dq: ir.Node) -> tuple:
        shape = dq.inputs[1].shape
        part_rank = dq.meta.get(RANK, None if shape is None else shape.rank())
        block = dq.attributes.get("block_size")
        zero = len(dq.inputs) > 2 and dq.inputs[2] is not None
        return (
            part_rank,
            _axis(dq, "axis", 1, rank),
            None if block is None else block.as_int(),
            zero,
        )

    kinds = {kind(p) for p in parts}
    if len(kinds) != 1 or next(iter(kinds))[0] != rank:
        return False
    _, axis, _, zero = kinds.pop()
    along = _axis(user, "axis", 0, rank)
    joined = [
        ir.node("Concat", [p.inputs[i] for p in parts], attributes={"axis": along})
        for i in range(3 if zero else 2)
    ]
    first = parts[0]
    attributes = {k: a.value for k, a in first.attributes.items() if k != "axis"}
    new_dq = ir.node(
        "DequantizeLinear",
        [n.outputs[0] for n in joined],
        attributes={**attributes, "axis": axis},
        version=first.version,
    )
    new_dq.meta[RANK] = rank
    graph.insert_before(user, [*joined, new_dq])
    new_dq.outputs[0].shape = user.outputs[0].shape
    new_dq.outputs[0].type = user.outputs[0].type
    ir.convenience.replace_all_uses_with(user.outputs[0], new_dq.outputs[0])
    graph.remove(user, safe=True)
    return True


def _rank(value: ir.Value | None) -> int | None:
    """The rank of ``value``: from its shape, or the Constant that makes it."""
    if value is None:
        return None
    if value.shape is not None:
        return value.shape.rank()
    producer = value.producer()
    if producer is None or producer.op_type != "Constant":
        return None
    if "value" in producer.attributes:
        return producer.attributes["value"].value.numpy().ndim
    if "value_int" in producer.attributes or "value_float" in producer.attributes:
        return 0
    return (
        1 if "value_ints" in producer.attributes or "value_floats" in producer.attributes else None
    )
