"""An exported ONNX graph whose weights stay on disk until it is saved.

torch.onnx exports a program traced on fake weights (`moec.models.lazy_weights`); here its
initializers become `onnx_ir.LazyTensor`s that build each weight from the checkpoint when the
external data is written, one at a time. The lowerings change weight layouts with ops on
initializers (transposes, gate/up interleaving), which the optimizer folds by computing them;
`fold_lazily` folds those nodes into lazy tensors first, so nothing is computed before saving.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx.reference import ReferenceEvaluator

from moec.errors import LoweringError
from moec.models.lazy_weights import Call, Recipe, materialize

__all__ = ["bind_lazy_initializers", "fold_lazily"]


def bind_lazy_initializers(model: ir.Model, recipes: dict[str, Recipe]) -> None:
    """Give each initializer that is a lazily loaded weight a tensor built from its recipe."""
    for name, value in model.graph.initializers.items():
        recipe = recipes.get(name)
        if recipe is None:
            continue
        value.const_value = ir.LazyTensor(
            _materializer(recipe), dtype=value.dtype, shape=value.shape, name=name
        )
    unbound = [
        name
        for name, value in model.graph.initializers.items()
        if name not in recipes and _is_fake(value.const_value)
    ]
    if unbound:
        raise LoweringError(
            f"initializers {unbound[:3]} have no data and no recipe; this is a bug in moec's "
            "streaming of weights"
        )


def _materializer(recipe: Recipe) -> Callable[[], ir.TensorProtocol]:
    return lambda: ir.Tensor(materialize(recipe).contiguous().numpy(force=True))


def _is_fake(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return type(raw).__name__ in ("FakeTensor", "FunctionalTensor") or getattr(
        raw, "is_meta", False
    )


def fold_lazily(model: ir.Model, recipes: dict[str, Recipe]) -> int:
    """Replace every standard-domain node whose inputs are all constants, one of them a lazy
    weight, by lazy initializers that compute it when saved; returns how many. An expert's
    slice of a stacked weight (``Gather`` of one index on axis 0) becomes a recipe of its own
    (`_selected`), so that writing it reads that expert's tensors only, not the whole stack."""
    opset = model.opset_imports.get("", 18)
    recipes = dict(recipes)  # by value name, grown with the selections made here
    folded = 0
    for node in list(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type == "Constant":
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or not any(isinstance(v.const_value, ir.LazyTensor) for v in inputs):
            continue
        constants = [ir.convenience.get_const_tensor(v) for v in inputs]
        if any(c is None for c in constants):
            continue
        proto = ir.serde.serialize_node(node)
        names = [v.name for v in inputs]
        types = _output_types(proto, names, node, opset, constants)
        if types is None:
            continue
        selected = _selected(node, recipes, constants)
        evaluate = _node_evaluator(proto, names, opset) if selected is None else None
        for i, (out, (dtype, shape)) in enumerate(zip(node.outputs, types, strict=True)):
            name = f"{out.name}_folded"
            initializer = ir.Value(name=name, shape=shape, type=ir.TensorType(dtype))
            if selected is None:
                build = _output_of(evaluate, constants, i)
            else:
                recipes[name], build = selected, _materializer(selected)
            initializer.const_value = ir.LazyTensor(build, dtype=dtype, shape=shape, name=name)
            model.graph.register_initializer(initializer)
            ir.convenience.replace_all_uses_with(out, initializer)
            if out.is_graph_output():
                raise LoweringError(f"graph output {out.name} is a constant weight")
        model.graph.remove(node, safe=True)
        folded += 1
    return folded


def _selected(node: ir.Node, recipes: dict[str, Recipe], constants) -> Recipe | None:
    """The recipe of ``Gather(weight, i, axis=0)`` with a scalar ``i``: one entry of a stacked
    weight (`materialize` builds just that entry of a stack); None for any other node."""
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return None
    base = recipes.get(node.inputs[0].name)
    index = constants[1]
    if (
        base is None
        or index.shape.dims != ()
        or index.dtype not in (ir.DataType.INT64, ir.DataType.INT32)
    ):
        return None
    return Call(torch.ops.aten.select.int, (base, 0, int(index.numpy())), {}, None)


SMALL = 1024  # elements of a constant whose values shape inference is given


def _output_types(
    proto, names: list[str], node: ir.Node, opset: int, constants: list[ir.TensorProtocol]
) -> list[tuple[ir.DataType, ir.Shape]] | None:
    """Each output's dtype and static shape, by ONNX shape inference on the node (``proto``,
    reading ``names``) alone, given the small constants' values (as Reshape's shape); None
    where it cannot tell."""
    types, data = {}, {}
    for name, constant in zip(names, constants, strict=True):
        shape = list(constant.shape.numpy())
        types[name] = onnx.helper.make_tensor_type_proto(int(constant.dtype), shape)
        if constant.size <= SMALL:
            data[name] = ir.serde.serialize_tensor(constant)
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, proto, types, data, opset_imports=[onnx.helper.make_opsetid("", opset)]
        )
    except Exception:  # onnx raises several types: this node is left to the optimizer
        return None
    found = []
    for out in node.outputs:
        tensor = inferred.get(out.name)
        if tensor is None or not tensor.tensor_type.HasField("shape"):
            return None
        dims = tensor.tensor_type.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            return None
        found.append(
            (ir.DataType(tensor.tensor_type.elem_type), ir.Shape([d.dim_value for d in dims]))
        )
    return found


def _node_evaluator(proto, names: list[str], opset: int) -> Callable[[list[np.ndarray]], list]:
    def run(arrays: list[np.ndarray]) -> list:
        evaluator = ReferenceEvaluator(proto, opsets={"": opset})
        return evaluator.run(None, dict(zip(names, arrays, strict=True)))

    return run


def _output_of(evaluate, constants, index: int) -> Callable[[], ir.TensorProtocol]:
    return lambda: ir.Tensor(np.ascontiguousarray(evaluate([c.numpy() for c in constants])[index]))
