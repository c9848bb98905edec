"""Slice scatters written as concatenations before ONNX export.

A family that assembles a tensor by slice assignment (DeepSeek's MLA writes the rotary half of
every key and query into a new tensor, ``k[..., nope:] = k_pe``) exports as
``aten.slice_scatter``, which torch.onnx lowers to Transpose -> ScatterND -> Transpose over the
whole tensor: with a KV cache, the whole key of every layer twice per decode step. With unit
step and constant bounds it equals a concatenation of the input's slices around the source
(Concat in ONNX), exactly."""

from __future__ import annotations

import sys

import torch
from torch.export import ExportedProgram

__all__ = ["slice_scatters_as_cats"]

aten = torch.ops.aten


def slice_scatters_as_cats(program: ExportedProgram) -> int:
    """Rewrite ``program``'s unit-step, constant-bound slice scatters in place; how many."""
    graph = program.graph_module.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.target is not aten.slice_scatter.default:
            continue
        base, src, dim, start, end, step = _arguments(node)
        value = base.meta.get("val")
        bounds = (start, end, step)
        if value is None or not all(isinstance(b, int) for b in bounds) or step != 1:
            continue
        dim %= value.dim()
        size = value.shape[dim]
        if start < 0 or end < start or (isinstance(size, int) and start > size):
            continue
        has_tail = end != sys.maxsize and not (isinstance(size, int) and end >= size)
        with graph.inserting_before(node):
            parts = [_slice(graph, base, dim, 0, start)] if start > 0 else []
            parts.append(src)
            if has_tail:
                parts.append(_slice(graph, base, dim, end, sys.maxsize))
            cat = graph.call_function(aten.cat.default, (parts, dim))
        cat.meta = dict(node.meta)
        node.replace_all_uses_with(cat)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        program.graph_module.recompile()
    return rewritten


def _arguments(node):
    names = ("input", "src", "dim", "start", "end", "step")
    defaults = {"dim": 0, "start": None, "end": None, "step": 1}
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    values = {name: values.get(name, defaults.get(name)) for name in names}
    start = 0 if values["start"] is None else values["start"]
    end = sys.maxsize if values["end"] is None else values["end"]
    return values["input"], values["src"], values["dim"], start, end, values["step"]


def _slice(graph, base, dim: int, start: int, end: int):
    node = graph.call_function(aten.slice.Tensor, (base, dim, start, end))
    value = base.meta["val"]
    with value.fake_mode:
        node.meta["val"] = aten.slice.Tensor(value, dim, start, end)
    return node
