"""Will TensorRT's ONNX parser take this graph? A check that needs no TensorRT.

`tensorrt_onnx_ops.json` is onnx-tensorrt's operator table as data (its source and TensorRT
version inside): which ops the parser supports, the element types of each op's data input, and
each op's restriction in words. `check_trt` applies it to every node, subgraphs included, and
checks the restrictions a graph shows: TopK sorted with k < 3840, ScatterND without a
reduction, axes and depths that are constants, If branches of one rank, Loop scan outputs of a
fixed length, Q/DQ with zero point 0, no contrib domains. Each problem names its node, op, why,
and the moec block (or module) it came from, read from the exporter's name scopes.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from moec.errors import ArtifactError

__all__ = ["MAX_TOPK", "OpTable", "TrtProblem", "check_trt", "count_nodes", "load_onnx", "op_table"]

log = logging.getLogger(__name__)
TABLE_FILE = Path(__file__).with_name("tensorrt_onnx_ops.json")
MAX_TOPK = 3840  # TensorRT's TopK takes k below this
STANDARD_DOMAINS = ("", "ai.onnx")
TYPE_NAMES = {  # ONNX element type -> the table's name for it
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT4: "INT4",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.FLOAT4E2M1: "FP4",
}
REDUCE_OPS = {
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
}  # fmt: skip
CONSTANT_INPUTS = {  # op -> (input index, what it is) that TensorRT needs at build time
    "CumSum": (1, "axis"),
    "OneHot": (1, "depth"),
    "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"),
    "Dropout": (2, "training_mode"),
    **{name: (1, "axes") for name in REDUCE_OPS},
}


@dataclass(frozen=True)
class OpTable:
    """onnx-tensorrt's operator table: ``ops`` maps an op to {supported, types, restriction}."""

    source: str
    tensorrt: str
    opsets: tuple[int, int]
    ops: dict[str, dict]


@functools.cache
def op_table() -> OpTable:
    data = json.loads(TABLE_FILE.read_text())
    return OpTable(data["source"], data["tensorrt"], tuple(data["opsets"]), data["ops"])


@dataclass(frozen=True)
class TrtProblem:
    """A node TensorRT's parser will not take: its name, op, why, and where it came from."""

    node: str
    op: str
    reason: str
    block: str


def check_trt(
    model: onnx.ModelProto | str | Path,
    blocks: list[str] = (),
    dim_max: dict[str, int] | None = None,
) -> list[TrtProblem]:
    """Every node of ``model`` (a proto or a ``.onnx`` path; external data is never read) that
    TensorRT's ONNX parser would refuse, by `op_table`. ``blocks``: the manifest's MoE block
    names, to say which block a node belongs to. ``dim_max``: the largest value of each named
    dynamic dim (the engine's profiles), which bounds a TopK whose k is computed at run time."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(Path(model))
    table = op_table()
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
    if not table.opsets[0] <= opset <= table.opsets[1]:
        low, high = table.opsets
        problems.append(
            TrtProblem("(model)", "", f"opset {opset} is outside {low}..{high}", "(model)")
        )
    try:  # the values' types and shapes, which the checks read
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as e:
        log.warning("ONNX shape inference failed (%s); checking the types the graph declares", e)
    graph = _Graph(model.graph, dict(dim_max or {}))
    where = functools.partial(_origin, blocks=tuple(blocks))
    for node, scope in _nodes(graph):
        for reason in _node_problems(node, scope, table):
            problems.append(TrtProblem(node.name or "(unnamed)", node.op_type, reason, where(node)))
    return problems


def load_onnx(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise ArtifactError(f"{path} is not a readable ONNX model ({e})") from e


class _Graph:
    """What the checks ask of a graph: each value's element type and shape, which values are
    constants (and their values), over nested graphs (a subgraph sees its outer values)."""

    def __init__(self, graph: onnx.GraphProto, dim_max: dict[str, int], outer=None):
        self.graph = graph
        self.dim_max = dim_max
        self.outer = outer
        self.types: dict[str, onnx.TypeProto] = {}
        for v in (*graph.input, *graph.output, *graph.value_info):
            self.types[v.name] = v.type
        self.constants = {t.name: t for t in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = value

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.constants:
            return numpy_helper.to_array(self.constants[name])
        return self.outer.constant(name) if self.outer is not None else None

    def is_constant(self, name: str) -> bool:
        own = name in self.constants
        return own or (self.outer is not None and self.outer.is_constant(name))

    def elem_type(self, name: str) -> int | None:
        if name in self.types and self.types[name].HasField("tensor_type"):
            return self.types[name].tensor_type.elem_type
        if name in self.constants:
            return self.constants[name].data_type
        return self.outer.elem_type(name) if self.outer is not None else None

    def value_bound(self, name: str) -> int | None:
        """The largest value of the integer tensor ``name``, where the graph shows it: a
        constant, or a Min (or a cast or reshape of one) with a bounded input."""
        value = self.constant(name)
        if value is not None:
            return int(np.max(value)) if value.size else None
        node = self.producers.get(name)
        if node is None:
            return self.outer.value_bound(name) if self.outer is not None else None
        if node.op_type == "Min":
            bounds = [b for b in (self.value_bound(i) for i in node.input if i) if b is not None]
            return min(bounds) if bounds else None
        if node.op_type in ("Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity"):
            return self.value_bound(node.input[0])
        return None

    def dim_bound(self, name: str, axis: int) -> int | None:
        """The largest size ``name`` may have along ``axis`` (None: unknown)."""
        typ = self.types.get(name)
        if typ is None or not typ.HasField("tensor_type"):
            return self.outer.dim_bound(name, axis) if self.outer is not None else None
        dims = typ.tensor_type.shape.dim
        if not dims or not -len(dims) <= axis < len(dims):
            return None
        dim = dims[axis]
        if dim.HasField("dim_value"):
            return dim.dim_value
        return self.dim_max.get(dim.dim_param)


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of ``graph``, those of its subgraphs included."""
    return sum(1 for _ in _nodes(_Graph(graph, {})))


def _nodes(graph: _Graph) -> Iterator[tuple[onnx.NodeProto, _Graph]]:
    for node in graph.graph.node:
        yield node, graph
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for sub in subgraphs:
                yield from _nodes(_Graph(sub, graph.dim_max, graph))


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _node_problems(node: onnx.NodeProto, graph: _Graph, table: OpTable) -> list[str]:
    if node.domain not in STANDARD_DOMAINS:
        return [f"domain {node.domain!r} is not standard ONNX: TensorRT parses no contrib ops"]
    entry = table.ops.get(node.op_type)
    if entry is None:
        return [f"{node.op_type} is not in TensorRT {table.tensorrt}'s operator table"]
    if not entry["supported"]:
        return [f"TensorRT {table.tensorrt} does not support {node.op_type}"]
    problems = []
    data = node.input[0] if node.input and node.input[0] else None
    elem = graph.elem_type(data) if data is not None else None
    if elem is not None and TYPE_NAMES.get(elem) not in entry["types"]:
        name = onnx.TensorProto.DataType.Name(elem).lower()
        problems.append(
            f"input {data!r} is {name}; TensorRT's {node.op_type} takes {', '.join(entry['types'])}"
        )
    return problems + _restrictions(node, graph)


def _restrictions(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    op = node.op_type
    problems = []
    if op in CONSTANT_INPUTS:
        index, what = CONSTANT_INPUTS[op]
        given = len(node.input) > index and node.input[index]
        if given and not graph.is_constant(node.input[index]):
            problems.append(f"its {what} is computed at run time; TensorRT needs a constant")
    if op == "TopK":
        problems += _topk(node, graph)
    elif op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
        problems.append(
            f"ScatterND with reduction={_attr(node, 'reduction').decode()}: TensorRT takes only "
            "reduction=none"
        )
    elif op == "If":
        ranks = [_output_ranks(_attr(node, branch)) for branch in ("then_branch", "else_branch")]
        if None not in ranks and ranks[0] != ranks[1]:
            problems.append(f"its branches' outputs differ in rank ({ranks[0]} vs {ranks[1]})")
    elif op == "Loop":
        body = _attr(node, "body")
        carried = len(body.input) - 2
        scans = len(body.output) - 1 - carried
        trip = node.input[0] if node.input else ""
        if scans > 0 and not (trip and graph.is_constant(trip)):
            problems.append("it has scan outputs of a length known only at run time")
    elif op == "DequantizeLinear" and len(node.input) > 2 and node.input[2]:
        zero = graph.constant(node.input[2])
        if zero is None or np.any(zero.astype(np.float64) != 0):
            problems.append("its zero point is not a constant 0; TensorRT takes only 0")
    elif op == "LayerNormalization" and sum(1 for o in node.output if o) > 1:
        problems.append("it returns its mean or inverse deviation; TensorRT returns only Y")
    return problems


def _topk(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    problems = []
    if _attr(node, "sorted", 1) != 1:
        problems.append("TopK with sorted=0: TensorRT takes only sorted=1")
    if graph.is_constant(node.input[1]):
        k = graph.value_bound(node.input[1])
        if k is not None and k >= MAX_TOPK:
            problems.append(f"k = {k}; TensorRT takes k < {MAX_TOPK}")
        return problems
    # a k computed at run time is at most the input's size along the axis, and what bounds it
    bounds = [
        graph.value_bound(node.input[1]),
        graph.dim_bound(node.input[0], _attr(node, "axis", -1)),
    ]
    bounds = [b for b in bounds if b is not None]
    bound = min(bounds) if bounds else None
    if bound is None:
        problems.append(
            f"k is computed at run time and nothing bounds it; TensorRT takes k < {MAX_TOPK}"
        )
    elif bound >= MAX_TOPK:
        problems.append(
            f"k is computed at run time and may reach {bound} (the axis it sorts); TensorRT "
            f"takes k < {MAX_TOPK}: lower the profile's largest shape"
        )
    return problems


def _output_ranks(graph: onnx.GraphProto) -> list[int] | None:
    """The ranks of a branch's outputs (None where one is unknown)."""
    ranks = []
    for value in graph.output:
        tensor = value.type.tensor_type
        if not (value.type.HasField("tensor_type") and tensor.HasField("shape")):
            return None
        ranks.append(len(tensor.shape.dim))
    return ranks


def _origin(node: onnx.NodeProto, blocks: tuple[str, ...]) -> str:
    """The moec block ``node`` was lowered from (by the exporter's name scopes), else the
    deepest module it belongs to, else ``(model)``."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        return "(model)"
    for scope in reversed(scopes):
        for block in blocks:
            if scope == block or (block and scope.endswith("." + block)):
                return f"MoE block {block or '(model)'}"
    for scope, kind in zip(reversed(scopes), reversed(classes), strict=False):
        if kind.endswith(".MoEBlock"):
            return f"MoE block {scope}"
    modules = [s for s in scopes[:-1] if s not in ("", "model")]  # the last is the node's own
    return modules[-1] if modules else "(model)"
