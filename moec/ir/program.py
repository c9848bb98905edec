"""The captured program: an ExportedProgram whose MoE blocks are ``moec::moe`` nodes, with its
signature and its blocks.

This module (with `MoEOpArgs`, which knows the op's argument layout) is the only code that reads
or writes a ``moec::moe`` node's spec and weights: passes set a block's lowering with
`CapturedProgram.set_lowering`, and `CapturedProgram.problems` is the IR check the pass manager
runs between passes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram

from moec import registry
from moec.errors import MoecError
from moec.ir.moe_op import MoEOpArgs, parse_spec
from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import EXPERT_WEIGHTS, MoEWeights
from moec.ir.signature import TensorSpec

__all__ = [
    "BlockRecord",
    "CapturedBlock",
    "CapturedProgram",
    "is_moe_node",
    "moe_nodes",
    "node_args",
    "node_spec",
    "set_node_spec",
]

MOE_OP = torch.ops.moec.moe.default


def is_moe_node(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is MOE_OP


def moe_nodes(graph: fx.Graph | ExportedProgram | fx.GraphModule) -> list[fx.Node]:
    """The ``moec::moe`` nodes of a graph (or of a program's graph), in graph order."""
    graph = graph.graph if isinstance(graph, (ExportedProgram, fx.GraphModule)) else graph
    return [n for n in graph.nodes if is_moe_node(n)]


def node_args(node: fx.Node) -> MoEOpArgs:
    """The arguments of a ``moec::moe`` node by name (graph nodes, or None)."""
    return MoEOpArgs.from_args(tuple(node.args))


def node_spec(node: fx.Node) -> MoESpec:
    return node_args(node).spec


def set_node_spec(node: fx.Node, spec: MoESpec) -> None:
    node.args = node_args(node).with_spec(spec).to_args()


@dataclass
class CapturedBlock:
    """One MoE block of a captured program and the module it came from.

    ``node`` names its ``moec::moe`` node; a block whose experts are modules has none (its
    experts run as exported subgraphs) and a ``fixed_lowering`` instead. ``reason``: why the
    block has the lowering it has, as the pass that chose it said.
    """

    name: str  # module path in the user's model ("" for the model itself)
    node: str
    class_name: str
    adapter: str
    summary: str
    reason: str = ""
    fixed_lowering: str | None = None


@dataclass(frozen=True)
class BlockRecord:
    """What a compile reports of one block (the manifest's ``blocks`` entries)."""

    name: str
    class_name: str
    adapter: str
    summary: str
    lowering: str | None
    reason: str
    experts: int | None = None  # stored experts (a block without a node: None)
    groups: int = 1  # the router's expert groups
    top_k: int = 0
    hidden: int = 0
    expert_size: int = 0
    expert_bytes: int = 0  # one expert's weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": self.class_name,
            "adapter": self.adapter,
            "summary": self.summary,
            "lowering": self.lowering,
            "reason": self.reason,
            "experts": self.experts,
            "groups": self.groups,
            "top_k": self.top_k,
            "hidden": self.hidden,
            "expert_size": self.expert_size,
            "expert_bytes": self.expert_bytes,
        }


@dataclass
class CapturedProgram:
    """An exported program whose MoE blocks are ``moec::moe`` nodes, with its signature.

    ``outputs`` are the model's own outputs followed by one routing mask per block that has a
    node (role ``routing``).
    """

    program: ExportedProgram
    blocks: list[CapturedBlock]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    notes: list[str] = field(default_factory=list)
    # state-dict name -> recipe of a weight left on disk (`moec.models.lazy_weights`)
    lazy_weights: dict[str, Any] = field(default_factory=dict)

    def moe_nodes(self) -> list[fx.Node]:
        return moe_nodes(self.program)

    def block_for(self, node: fx.Node) -> CapturedBlock:
        return next(b for b in self.blocks if b.node == node.name)

    def node_for(self, block: CapturedBlock) -> fx.Node | None:
        return next((n for n in self.moe_nodes() if n.name == block.node), None)

    def spec(self, node: fx.Node) -> MoESpec:
        return node_spec(node)

    def present_weights(self, node: fx.Node) -> set[str]:
        """The names of the weights the node is given (not None)."""
        return {name for name, arg in node_args(node).weights.items() if arg is not None}

    def set_lowering(
        self,
        node: fx.Node,
        lowering: str,
        reason: str,
        capacity_factor: float | None = None,
    ) -> None:
        """Give the block of ``node`` a registered lowering, and say why."""
        set_node_spec(node, self.spec(node).with_lowering(lowering, capacity_factor))
        self.block_for(node).reason = reason

    def lowering_of(self, block: CapturedBlock) -> str | None:
        node = self.node_for(block)
        return block.fixed_lowering if node is None else self.spec(node).lowering

    def block_records(self) -> list[BlockRecord]:
        records = []
        for b in self.blocks:
            node = self.node_for(b)
            record = BlockRecord(
                b.name, b.class_name, b.adapter, b.summary, self.lowering_of(b), b.reason
            )
            if node is not None:
                spec = self.spec(node)
                size = _expert_bytes(node_args(node))
                record = dataclasses.replace(
                    record,
                    experts=spec.num_experts,
                    groups=spec.n_group,
                    top_k=spec.top_k,
                    hidden=spec.hidden_size,
                    expert_size=spec.expert_size,
                    expert_bytes=size,
                )
            records.append(record)
        return records

    def problems(self) -> list[str]:
        """The IR check: each ``moec::moe`` node belongs to one block, its spec is valid, its
        weights have the shapes the spec implies, and its lowering (if set) is registered and
        can compute it. Empty when the program is consistent."""
        found: list[str] = []
        nodes = self.moe_nodes()
        names = [b.node for b in self.blocks if b.fixed_lowering is None]
        if sorted(names) != sorted(n.name for n in nodes):
            found.append(
                f"blocks name nodes {sorted(names)}, the graph has {[n.name for n in nodes]}"
            )
        for node in nodes:
            found += [f"node {node.name}: {p}" for p in _node_problems(node)]
        return found


def _node_problems(node: fx.Node) -> list[str]:
    args = node_args(node)
    try:
        spec = parse_spec(args.spec_json)
    except MoecError as e:
        return [str(e)]
    found = []
    expected = MoEWeights.expected_shapes(spec)
    required = MoEWeights.required(spec)
    for name, arg in args.weights.items():
        shape = _shape(arg)
        if arg is None:
            if name in required:
                found.append(f"{name} is required by {spec.summary()}")
        elif expected[name] is None:
            found.append(f"{name} given, but {spec.summary()} has no use for it")
        elif shape is not None and shape != expected[name]:
            found.append(f"{name} has shape {shape}, the spec implies {expected[name]}")
    x_shape = _shape(args.x)
    if x_shape is not None and x_shape[-1] != spec.hidden_size:
        found.append(f"input has hidden size {x_shape[-1]}, the spec says {spec.hidden_size}")
    if spec.lowering is not None:
        found += [
            f"lowering {spec.lowering}: {reason}"
            for reason in registry.lowering(spec.lowering).unsupported_reasons(spec)
        ]
    return found


def _expert_bytes(args: MoEOpArgs) -> int:
    """Bytes of one expert's weights (its slice of each stacked expert tensor)."""
    total = 0
    for name in EXPERT_WEIGHTS:
        value = getattr(args.weights.get(name), "meta", {}).get("val")
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            total += math.prod(int(d) for d in value.shape[1:]) * value.element_size()
    return int(total)


def _shape(arg: Any) -> tuple[int, ...] | None:
    value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else -1 for d in value.shape)  # -1: a dynamic dim
