"""Lower a captured program to ONNX.

torch.onnx (dynamo) translates the graph; each ``moec::moe`` node is translated by the ``onnx``
emitter of the registered lowering its spec names (a lowering pass chose it). The result is
optimized with onnxscript's optimizer with size limits lifted, so that weight layout changes
(transposes, gate/up interleaving) are folded into the initializers instead of running at every
inference.
"""

from __future__ import annotations

import logging
import operator
import re

import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from moec import registry
from moec.compiler.clamp_bounds import clamp_bounds_as_floats
from moec.compiler.dequantize_late import dequantize_late
from moec.compiler.keep_tiny_constants import keep_tiny_constants
from moec.compiler.lazy_initializers import bind_lazy_initializers, fold_lazily
from moec.compiler.lower_quantized import QUANT_OPSET, dequantized_weights, translate_dequantize
from moec.compiler.onnx_ops import BOOL, INT64, op, register_ort_schemas
from moec.compiler.slice_scatter_to_cat import slice_scatters_as_cats
from moec.errors import LoweringError
from moec.ir.moe_op import MoEOpArgs
from moec.ir.program import CapturedProgram

__all__ = ["lower_to_onnx"]

log = logging.getLogger(__name__)
ONNX_STANDARD_DOMAINS = {"", "ai.onnx"}
NO_SIZE_LIMIT = 1 << 62


def translate_moe(*args):
    """torch.onnx translation of ``moec::moe`` (same arguments as the op), by the ``onnx``
    emitter of the block's lowering."""
    op = MoEOpArgs.from_args(args)
    spec = op.spec
    weights = {name: t for name, t in op.weights.items() if t is not None}
    if spec.routing == "external":
        weights.update(routed_ids=op.routed_ids, routed_weights=op.routed_weights)
    if spec.lowering is None:
        raise LoweringError(
            "a moec::moe node reached the ONNX exporter without a lowering; run a lowering "
            "pass (grouped-gemm, select-lowering or capacity) first"
        )
    lowering = registry.lowering(spec.lowering)
    emit = lowering.onnx
    if emit is None:
        raise LoweringError(f"lowering {spec.lowering} has no ONNX emitter")
    if not lowering.quantized_weights:
        spec, weights = dequantized_weights(spec, weights)
    return registry.resolve(emit)(spec, x=op.x, w=weights)


def translate_floordiv(a, b):
    """Python's ``//`` on SymInts, which floors. onnxscript's translation is ONNX Div, which
    truncates: the ceil-division idiom ``-(-n // b)`` came out one short for n not a
    multiple of b (an empty dim where a shape needs one block)."""
    quotient = op.Div(a, b)
    inexact = op.Cast(op.Sub(a, op.Mul(quotient, b)), to=BOOL)
    signs_differ = op.Xor(op.Less(a, 0), op.Less(b, 0))
    return op.Sub(quotient, op.Cast(op.And(inexact, signs_differ), to=INT64))


def translate_signbit(x):
    """``signbit`` (from ``copysign``; Kolibri 1.1's NVFP4 rounding), which ONNX lacks: ``x < 0``,
    or ``x`` a negative zero (``1 / -0.0`` is ``-inf``). A NaN's sign bit is not read."""
    negative_zero = op.And(
        op.Equal(x, op.CastLike(0, x)), op.Less(op.Reciprocal(x), op.CastLike(0, x))
    )
    return op.Or(op.Less(x, op.CastLike(0, x)), negative_zero)


def lower_to_onnx(captured: CapturedProgram, standard_ops_only: bool, rewrite=None) -> ir.Model:
    """The captured program as an ONNX model (onnx-ir); ``standard_ops_only``: refuse a graph
    that uses a contrib domain (a portable target's promise); ``rewrite(model)``: a target's
    last edit of the graph (a registry hook), after the optimizer."""
    register_ort_schemas()
    _quiet_exporter_logs()
    table = {
        torch.ops.moec.moe.default: translate_moe,
        operator.floordiv: translate_floordiv,
        torch.ops.prims.signbit.default: translate_signbit,
        torch.ops.moec.dequantize.default: translate_dequantize,
    }
    program = captured.program.run_decompositions({})  # functional: slice writes are scatters
    slice_scatters_as_cats(program)
    clamp_bounds_as_floats(program)
    try:
        exported = torch.onnx.export(
            program,
            (),
            dynamo=True,
            custom_translation_table=table,
            optimize=False,
            **_opset(captured),
            verbose=False,
        )
    except Exception as e:  # the exporter wraps everything in its own error types
        raise LoweringError(_describe_failure(e)) from e
    model = exported.model
    for value, spec in zip(model.graph.inputs, captured.inputs, strict=True):
        value.name = spec.name
    for value, spec in zip(model.graph.outputs, captured.outputs, strict=True):
        value.name = spec.name
    keep_tiny_constants(model)  # before the optimizer's no-op rules drop them
    dequantize_late(model)  # layout ops on the stored codes, folded by the optimizer
    if len({b.name for b in captured.blocks}) < len(captured.blocks):
        # a block called more than once: one layout change of its weights, folded once
        CommonSubexpressionEliminationPass()(model)
    if captured.lazy_weights:
        bind_lazy_initializers(model, captured.lazy_weights)
        onnxscript.optimizer.fold_constants(
            model
        )  # the small constants, as lazy folding reads them
        fold_lazily(model, captured.lazy_weights)
    onnxscript.optimizer.optimize(
        model, input_size_limit=NO_SIZE_LIMIT, output_size_limit=NO_SIZE_LIMIT
    )
    _drop_unused_router_outputs(model)
    _drop_split_num_outputs(model)
    if rewrite is not None:
        registry.resolve(rewrite)(model)
    if standard_ops_only:
        _check_standard_domains(model)
    return model


def _opset(captured: CapturedProgram) -> dict:
    """The exporter's opset: 21 where weights are quantised (blocked DequantizeLinear: a
    block's experts, or a ``moec::dequantize``), the exporter's default otherwise."""
    specs = (captured.spec(node) for node in captured.moe_nodes())
    dequantize = torch.ops.moec.dequantize.default
    quantized = any(spec.weight_bits is not None for spec in specs) or any(
        node.target is dequantize for node in captured.program.graph.nodes
    )
    return {"opset_version": QUANT_OPSET} if quantized else {}


def _drop_unused_router_outputs(model: ir.Model) -> None:
    """Give ``MoEGroupRouter`` nodes only the output they use.

    The exporter creates every output a schema declares, but ORT reads a requested
    ``selection_scores``/``router_weights`` pair as a different mode of the op and refuses it
    beside ``router_probs``.
    """
    for node in list(model.graph):
        if node.op_type != "MoEGroupRouter" or len(node.outputs) == 1:
            continue
        live = set(model.graph)  # the exporter's own dead nodes may still be listed as uses
        if any(
            out.is_graph_output() or any(use.node in live for use in out.uses())
            for out in node.outputs[1:]
        ):
            continue
        slim = ir.Node(
            node.domain, node.op_type, node.inputs, node.attributes.values(), num_outputs=1
        )
        model.graph.insert_before(node, slim)
        ir.convenience.replace_all_uses_with(node.outputs[0], slim.outputs[0])
        model.graph.remove(node, safe=True)


def _drop_split_num_outputs(model: ir.Model) -> None:
    """Split with a ``split`` input must not carry ``num_outputs`` (ONNX Runtime refuses the
    pair), but torch.onnx only learns a Split's output count from that attribute; so the
    lowerings set it and it is removed here."""
    for node in model.graph:
        if node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
            node.attributes.pop("num_outputs", None)


def _check_standard_domains(model: ir.Model) -> None:
    foreign = sorted({n.domain for n in model.graph if n.domain not in ONNX_STANDARD_DOMAINS})
    if foreign:
        raise LoweringError(
            f"the portable ONNX uses non-standard op domains {foreign}; "
            "this is a bug in moec's lowering"
        )


NODE_RE = re.compile(r"Error when translating node %(\w+) .*?target=([\w.:]+)", re.S)
DISPATCH_RE = re.compile(
    r"No ONNX function found for <OpOverload\(op='([\w.:]+)'.*?Failure message: (.*)"
)


def _describe_failure(error: Exception) -> str:
    """Name the op and node that could not be lowered, when the exporter says which."""
    chain, e = [], error
    while e is not None:
        chain.append(str(e).strip())
        e = e.__cause__ or e.__context__
    node = next((m for text in chain if (m := NODE_RE.search(text))), None)
    dispatch = next((m for text in chain if (m := DISPATCH_RE.search(text))), None)
    if node and dispatch:
        why = dispatch.group(2).splitlines()[0]
        return (
            f"cannot lower to ONNX: no ONNX translation for node {node.group(1)} "
            f"({node.group(2).removeprefix('torch.ops.')}): {why}. Replace the op in the model, "
            "or register a translation for it with torch.onnx"
        )
    if node:
        last = chain[-1].splitlines()[0] if chain[-1] else type(error).__name__
        return f"cannot lower node {node.group(1)} ({node.group(2)}) to ONNX: {last}"
    messages = [text.splitlines()[0] for text in chain if text]
    return "cannot lower to ONNX: " + " <- ".join(messages[-3:])


def _quiet_exporter_logs() -> None:
    # torch.onnx warns about torchvision ops at every export; moec never uses them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
