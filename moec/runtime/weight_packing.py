"""Load-time weight packing for ``torch`` artifacts.

`pack_weights` replaces every ``moec::moe`` node of a loaded program by a `PackedMoE` module that
holds the block's expert weights in oneDNN's blocked GEMM layout (`PackedGemm`, which also lets
MKL read that layout where it is faster, on a few rows on some hosts), and every ``aten.linear``
with a stored weight (attention, a family's shared expert, the LM head) by a `PackedLinear`,
except weights of fewer than `MIN_PACKED_OUT_FEATURES` output rows (a router over a few
experts), where oneDNN's cost per call outweighs its faster kernel. Weights are packed once when
the artifact is loaded and the dense copies are dropped, so memory stays at one copy of the
weights (as ONNX Runtime prepacks its MatMul weights at session creation). Gate and up
projections are packed as one [2I, H] matrix: one GEMM per expert instead of two. No-op dtype
conversions (a family's ``.float()`` on float32 tensors) and the exporter's metadata checks
before them are dropped first: each costs a dispatch at every call, and a conversion on a
weight hides it from packing.

Why one packed layout: packed weights are faster than dense ones at most token counts on the
hosts measured (docs/performance.md), and two layouts would double the weights. Routing,
grouping and combining are the eager kernel's own (`moec.ir.moe_eager`), so the packed block
computes the same function (at many rows per expert with its experts side by side, one per
thread: `moec.runtime.expert_threads`), except at one token routed by the family's router, where
grouping and combining take a shorter path of their own (`PackedMoE._one_token`); only float32
blocks whose lowering's kernel is the per-expert one (``kernel``) on a torch built with oneDNN
are packed, any other node keeps running the op's kernel. A quantised block's experts are
packed for PyTorch's weight-only int kernels instead (`moec.runtime.quantized_gemm`), the
artifact keeping their codes and scales.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import fx, nn

from moec.ir.expert_kernels import (
    ONEDNN,
    PLAIN_ACTIVATION_FUNCTIONS,
    expert_segments,
    gated_activation,
    grouped_experts,
    post_expert_norm,
)
from moec.ir.moe_op import (
    carry_nonfinite,
    chosen_from_ids,
    experts_kernel,
    gather_experts_scatter,
    moe_eager,
)
from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import QUANT_WEIGHTS, QUANTIZED, MoEWeights
from moec.ir.program import is_moe_node, node_args
from moec.runtime.expert_threads import run_side_by_side, side_by_side
from moec.runtime.graph_edits import attribute, call_module_instead
from moec.runtime.packed_gemm import PackedGemm
from moec.runtime.quantized_gemm import QuantizedGemm

__all__ = [
    "PackedLinear",
    "PackedMoE",
    "PackingReport",
    "expert_gemm",
    "pack_weights",
    "packable",
]

MIN_PACKED_OUT_FEATURES = 64  # linear weights with fewer output rows stay dense (see above)

# the tensors the routing and combine read as they are stored
ROUTING_WEIGHTS = ("router_weight", "router_bias", "selection_bias", "shared_expert_gate")
ASSERTED = ("dtype", "device", "layout")  # what _assert_tensor_metadata checks we can drop


def packable(spec: MoESpec, weights: MoEWeights) -> bool:
    """Whether `PackedMoE` can hold this block: FFN experts, float32 (a quantised block's codes
    and zero points aside), oneDNN built in, and a lowering whose kernel is the per-expert one
    it packs (`grouped_experts`; ``grouped_mm`` runs on the stored weights)."""
    zeros = {n for n in QUANT_WEIGHTS if n.endswith("_zero")}
    codes = {*QUANTIZED, *zeros} if spec.weight_bits else set()
    return (
        ONEDNN
        and spec.expert_kind != "module"
        and experts_kernel(spec.lowering) is grouped_experts
        and all(t.dtype == torch.float32 for name, t in weights.items() if name not in codes)
    )


def expert_gemm(
    spec: MoESpec, w: MoEWeights, names: tuple[str, ...], e: int
) -> PackedGemm | QuantizedGemm:
    """Expert ``e``'s matrices ``names`` stacked along their output rows as one packed GEMM:
    oneDNN's for float weights, PyTorch's int kernels for quantised ones (`QuantizedGemm`)."""
    if spec.weight_bits is None:
        return PackedGemm(torch.cat([getattr(w, n)[e] for n in names]))
    parts = [[getattr(w, f"{n}{part}") for n in names] for part in ("", "_scale", "_zero")]
    codes, scale, zero = (None if t[0] is None else torch.cat([x[e] for x in t]) for t in parts)
    return QuantizedGemm(codes, scale, zero, spec.weight_bits)


def _cat_or_none(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    if all(t is None for t in tensors):
        return None
    like = next(t for t in tensors if t is not None)
    return torch.cat([torch.zeros_like(like) if t is None else t for t in tensors])


class PackedMoE(nn.Module):
    """One MoE block with packed expert weights: ``forward(x, routed_ids, routed_weights) ->
    (out, chosen)``, the signature and results of ``torch.ops.moec.moe`` without the weights."""

    def __init__(self, spec: MoESpec, weights: MoEWeights):
        super().__init__()
        if not packable(spec, weights):
            raise ValueError(f"PackedMoE cannot hold {spec.summary()}")
        self.spec = spec
        kept = {n: getattr(weights, n) for n in (*ROUTING_WEIGHTS, "output_bias")}
        for name, tensor in kept.items():  # still the module's tensors, for state_dict()
            self.register_buffer(name, tensor)
        self.routing = MoEWeights(w_up=None, w_down=None, **kept)
        # one token's path: routing given as the stored experts' ids (not router experts
        # mapped onto merged ones), the gates applied to the experts' outputs
        self.one_token_path = (
            spec.routing == "external" and spec.expert_map is None and not spec.gate_on_input
        )
        w = weights

        def at(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
            return None if t is None else t[e]

        self.first, self.first_bias, self.down, self.down_bias = [], [], [], []
        for e in range(spec.num_experts):
            if spec.expert_kind == "gated":  # rows gate, then up
                self.first.append(expert_gemm(spec, w, ("w_gate", "w_up"), e))
                self.first_bias.append(_cat_or_none(at(w.b_gate, e), at(w.b_up, e)))
            else:
                self.first.append(expert_gemm(spec, w, ("w_up",), e))
                self.first_bias.append(at(w.b_up, e))
            self.down.append(expert_gemm(spec, w, ("w_down",), e))
            self.down_bias.append(at(w.b_down, e))
        self.post_norm_weight = [at(w.post_norm_weight, e) for e in range(spec.num_experts)]
        self.shared_first = self.shared_down = None
        if spec.shared_expert_size:
            self.shared_first = PackedGemm(torch.cat([w.shared_gate, w.shared_up]))
            self.shared_down = PackedGemm(w.shared_down)

    def experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows grouped by expert [P, H] -> [P, H]: one GEMM per expert and projection. At many
        rows per expert the experts run side by side, one per thread (`expert_threads`);
        otherwise in turn, each GEMM on every thread, with the activation once over every
        expert's rows (not once per expert: at a few tokens per expert the per-call cost of
        small elementwise ops adds up)."""
        active = expert_segments(rows, counts)
        threads = torch.get_num_threads()
        if side_by_side([len(c) for _, c in active], threads):
            tasks = [(len(c), functools.partial(self._expert, e, c)) for e, c in active]
            return torch.cat(run_side_by_side(tasks, threads))
        return self._in_turn(active)

    def _grouped_in_turn(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`experts` once `routed` has found that they run in turn."""
        return self._in_turn(expert_segments(rows, counts))

    def _in_turn(self, active: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """(e, expert e's rows) pairs -> their outputs, concatenated in the pairs' order."""
        first = torch.cat([self.first[e](c, self.first_bias[e]) for e, c in active])
        chunks = self._activation(first).split([len(c) for _, c in active])
        return torch.cat([self._down(e, h) for (e, _), h in zip(active, chunks, strict=True)])

    def routed(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        tokens: torch.Tensor,
        counts: list[int],
        gates: torch.Tensor,
    ) -> torch.Tensor:
        """``out`` plus the routed experts' outputs, each times its gate, at their tokens (the
        ``experts`` step of `moe_eager`). Side by side, each expert gathers its own rows and
        scales its own output in its worker, and those outputs are added into ``out`` one by
        one: no [P, H] tensor of all pairs, which at thousands of tokens is tens of MB of fresh
        memory, paged in as it is first written."""
        sizes = [n for n in counts if n]
        threads = torch.get_num_threads()
        if not side_by_side(sizes, threads):
            return gather_experts_scatter(self._grouped_in_turn, out, x, tokens, counts, gates)
        active = [e for e, n in enumerate(counts) if n]
        parts = list(
            zip(active, tokens.split(sizes), gates.unsqueeze(-1).split(sizes), strict=True)
        )
        tasks = [(len(t), functools.partial(self._gated_expert, e, x, t, g)) for e, t, g in parts]
        for (_, t, _), y in zip(parts, run_side_by_side(tasks, threads), strict=True):
            out.index_add_(0, t, y)  # moe_eager's own tensor
        return out

    def _one_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """`forward` on one token routed by the family (ids and weights [..., k]): each chosen
        expert runs on the token itself (no gather), the activation once over all k, and the
        gates combine the k outputs in one matmul (no scatter). At one token the block's time
        beyond its GEMMs is its small ops and the Python between them, so fewer ops matter.
        Each slot is a pair, as in `moe_eager`: an expert chosen twice runs twice and its
        outputs add up."""
        chosen = chosen_from_ids(self.spec, ids)  # first: an id out of range fails here
        flat = x.reshape(1, -1)
        out = self._in_turn([(e, flat) for e in ids.reshape(-1).tolist()])
        gates = weights.reshape(1, -1).to(x.dtype)
        if self.shared_first is None:
            out = gates @ out
        else:
            out = torch.addmm(self._shared(flat), gates, out)
        if self.routing.output_bias is not None:
            out = out + self.routing.output_bias
        return carry_nonfinite(out, flat).reshape(x.shape), chosen

    def _gated_expert(self, e: int, x: torch.Tensor, tokens: torch.Tensor, gates: torch.Tensor):
        return self._expert(e, x.index_select(0, tokens)) * gates

    def _expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        return self._down(e, self._activation(self.first[e](rows, self.first_bias[e])))

    def _down(self, e: int, hidden: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s down projection of its activations (and its post-expert norm)."""
        out = self.down[e](hidden, self.down_bias[e])
        return post_expert_norm(self.spec, out, self.post_norm_weight[e])

    def _activation(self, first: torch.Tensor) -> torch.Tensor:
        """The experts' activation on their first projection ([n, 2I] gate then up if gated)."""
        if self.spec.expert_kind == "gated":
            size = self.spec.expert_size
            return gated_activation(self.spec, first[:, :size], first[:, size:])
        return PLAIN_ACTIVATION_FUNCTIONS[self.spec.activation](first)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_first is None:
            return torch.zeros_like(x)
        size = self.spec.shared_expert_size
        first = self.shared_first(x)
        hidden = (
            PLAIN_ACTIVATION_FUNCTIONS[self.spec.shared_activation](first[:, :size])
            * first[:, size:]
        )
        out = self.shared_down(hidden)
        if self.spec.shared_expert_gated:
            out = out * torch.sigmoid(x @ self.routing.shared_expert_gate.T)
        return out

    def forward(self, x, routed_ids=None, routed_weights=None):
        given = routed_ids is not None and routed_weights is not None
        if given and self.one_token_path and x.numel() == x.shape[-1]:
            return self._one_token(x, routed_ids, routed_weights)
        return moe_eager(
            self.spec,
            self.routing,
            x,
            routed_ids,
            routed_weights,
            experts=self.routed,
            shared=self._shared,
        )


class PackedLinear(nn.Module):
    """``aten.linear(x [..., in], weight [out, in], bias)`` with the weight packed."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.gemm, self.bias = PackedGemm(weight), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.bias)


@dataclass
class PackingReport:
    moe_blocks: int = 0
    linears: int = 0
    conversions: int = 0  # no-op dtype conversions (and their metadata asserts) dropped


def pack_weights(module: fx.GraphModule) -> PackingReport:
    """Pack the GEMM weights of ``module`` (from ``ExportedProgram.module()``) in place: each
    packable ``moec::moe`` call becomes a `PackedMoE`, each float32 ``aten.linear`` with a stored
    weight a `PackedLinear`, and the dense weights they no longer read are dropped."""
    report = PackingReport()
    if not ONEDNN:
        return report
    report.conversions = _drop_noop_conversions(module.graph)
    for node in list(module.graph.nodes):
        if node.op != "call_function":
            continue
        if is_moe_node(node):
            report.moe_blocks += _pack_moe(module, node, report.moe_blocks)
        elif node.target is torch.ops.aten.linear.default:
            report.linears += _pack_linear(module, node, report.linears)
    if report.moe_blocks or report.linears or report.conversions:
        module.graph.lint()
        module.recompile()
    return report


def _drop_noop_conversions(graph: fx.Graph) -> int:
    """Drop ``aten.to.dtype`` calls on tensors that already have that dtype, and the exporter's
    ``_assert_tensor_metadata`` checks that hold by the graph's own metadata; return how many.

    Families write ``x.type(torch.float32)`` around their routers: in a float32 program these
    are no-ops that still cost a dispatch at every call, and one standing between a stored
    weight and its ``aten.linear`` keeps the weight from being packed. The dtypes, devices and
    layouts the checks assert follow from the inputs', which the runner checks."""
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source, value = node.args[0], node.args[0].meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        if node.target is torch.ops.aten.to.dtype:
            noop = node.args[1:] == (value.dtype,) and not node.kwargs
        elif node.target is torch.ops.aten._assert_tensor_metadata.default:
            noop = set(node.kwargs) <= set(ASSERTED) and all(
                want is None or getattr(value, key) == want for key, want in node.kwargs.items()
            )
        else:
            continue
        if noop:  # a conversion's users read its input instead; a check has no users
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            dropped += 1
    return dropped


def _stored(node) -> bool:
    return node is None or (isinstance(node, fx.Node) and node.op == "get_attr")


def _pack_moe(module: fx.GraphModule, node: fx.Node, index: int) -> int:
    args = node_args(node)
    if not all(_stored(a) for a in args.weights.values()):
        return 0  # a weight computed in the graph: leave the node to the op's kernel
    tensors = {
        name: None if a is None else attribute(module, a.target) for name, a in args.weights.items()
    }
    spec, weights = args.spec, MoEWeights(**tensors)
    if not packable(spec, weights):
        return 0
    packed = PackedMoE(spec, weights)
    inputs = (args.x, args.routed_ids, args.routed_weights)
    call_module_instead(
        module, node, f"moec_packed_moe_{index}", packed, inputs, args.weights.values()
    )
    return 1


def _pack_linear(module: fx.GraphModule, node: fx.Node, index: int) -> int:
    x, weight, bias = (*node.args, None)[:3]
    if node.kwargs or not (weight is not None and _stored(weight) and _stored(bias)):
        return 0
    w = attribute(module, weight.target)
    b = None if bias is None else attribute(module, bias.target)
    if w.dim() != 2 or w.dtype != torch.float32 or (b is not None and b.dtype != w.dtype):
        return 0
    if len(w) < MIN_PACKED_OUT_FEATURES:  # a router over a few experts: faster dense
        return 0
    packed = PackedLinear(w, None if b is None else b.detach())
    call_module_instead(module, node, f"moec_packed_linear_{index}", packed, [x], [weight, bias])
    return 1
