"""The `moec::moe` operator: one MoE block as one node of an exported graph.

``torch.ops.moec.moe(x, routed_ids, routed_weights, *MoEWeights.args(), spec_json)
-> (out, chosen)``; `MoEOpArgs` is the one reader and writer of that argument layout.

- ``x``: [B, S, H] or [T, H] (a 2-D input is one sequence), float32/float16/bfloat16.
- ``routed_ids`` int64 [..., k] and ``routed_weights`` [..., k]: the routing, when the block's
  own router computed it (``spec.routing == "external"``); None otherwise.
- weights, in the order of `WEIGHT_NAMES` (optional ones may be None):
  ``router_weight`` [E, H] (None for external routing), ``router_bias`` [E], ``selection_bias`` [E],
  ``w_gate`` [E, I, H] (gated experts only), ``w_up`` [E, I, H], ``w_down`` [E, H, I],
  ``b_gate`` [E, I], ``b_up`` [E, I], ``b_down`` [E, H],
  ``shared_gate`` [Is, H], ``shared_up`` [Is, H], ``shared_down`` [H, Is],
  ``shared_expert_gate`` [1, H], ``output_bias`` [H] (added to every token's output),
  ``post_norm_weight`` [E, H] (scales each expert's normalised output),
  ``w_*_scale`` and ``w_*_zero`` [E, N, K/B]: a quantised block's scales and zero points.
- ``spec_json``: `MoESpec.to_json()`.
- ``out``: like ``x``; ``chosen``: bool [..., E], which experts serve each token (the routing,
  exposed so that verification can compare it).

The eager kernel routes in float32 and runs each expert on its own tokens only, with the experts
kernel of the block's lowering (`experts_kernel`). It is the reference every lowering is checked
against.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from moec import registry
from moec.errors import SpecError
from moec.ir.expert_kernels import grouped_experts, shared_ffn
from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import WEIGHT_NAMES, MoEWeights
from moec.ir.quantized_experts import dequantized_block
from moec.ir.routing import map_experts, route, router_logits

__all__ = [
    "MoEOpArgs",
    "carry_nonfinite",
    "chosen_from_ids",
    "experts_kernel",
    "gather_experts_scatter",
    "moe_eager",
    "scatter_routing",
]


@dataclass(frozen=True)
class MoEOpArgs:
    """The arguments of one ``moec::moe`` call, by name: graph nodes in an FX graph, tensors or
    ONNX values elsewhere. ``weights`` maps each of `WEIGHT_NAMES` to its argument (or None)."""

    x: Any
    routed_ids: Any
    routed_weights: Any
    weights: dict[str, Any]
    spec_json: str

    @classmethod
    def from_args(cls, args: tuple) -> MoEOpArgs:
        x, routed_ids, routed_weights, *tensors, spec_json = args
        if len(tensors) != len(WEIGHT_NAMES):
            raise SpecError(f"moec::moe takes {len(WEIGHT_NAMES) + 4} arguments, not {len(args)}")
        return cls(
            x, routed_ids, routed_weights, dict(zip(WEIGHT_NAMES, tensors, strict=True)), spec_json
        )

    def to_args(self) -> tuple:
        tensors = (self.weights[name] for name in WEIGHT_NAMES)
        return (self.x, self.routed_ids, self.routed_weights, *tensors, self.spec_json)

    @property
    def spec(self) -> MoESpec:
        return parse_spec(self.spec_json)

    def with_spec(self, spec: MoESpec) -> MoEOpArgs:
        return dataclasses.replace(self, spec_json=spec.to_json())


@functools.lru_cache(maxsize=256)
def parse_spec(spec_json: str) -> MoESpec:
    return MoESpec.from_json(spec_json)


def experts_kernel(lowering: str | None):
    """The PyTorch experts kernel of a block lowered to ``lowering``: the registered lowering's
    ``kernel`` where it has one, `grouped_experts` (the reference) otherwise."""
    hook = registry.lowering(lowering).kernel if lowering is not None else None
    return registry.resolve(hook) if hook is not None else grouped_experts


def moe_eager(
    spec: MoESpec,
    w: MoEWeights,
    x: torch.Tensor,
    routed_ids: torch.Tensor | None = None,
    routed_weights: torch.Tensor | None = None,
    experts=None,
    shared=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE block: route in float32, run each expert on its own tokens only (the kernel of
    the ``torch`` target and the reference every ONNX lowering is checked against).

    ``experts(out [T, H], x [T, H], tokens [P], counts, gates [P]) -> [T, H]`` adds the routed
    experts to ``out`` (a tensor of this call's own, which it may update in place): each
    (token, expert) pair's expert output on that token, times the pair's gate, the pairs
    grouped by expert (``counts[e]`` of them for expert e); ``shared(x [T, H]) -> [T, H]``
    computes the shared expert. Defaults: `shared_ffn`, and `gather_experts_scatter` with the
    experts kernel of the block's lowering (`experts_kernel`), on ``w``; only the routing
    tensors of ``w`` are read otherwise. A ``gate_on_input`` block calls ``experts`` on its
    pairs' gated rows (`_gating_inputs`)."""
    if spec.routing == "external":
        if routed_ids is None or routed_weights is None:
            raise SpecError("moec::moe: external routing needs routed_ids and routed_weights")
        if spec.expert_map is None:
            chosen, (tokens, counts, gates) = _pairs_from_ids(spec, routed_ids, routed_weights)
        else:
            weights, chosen = map_experts(spec, *scatter_routing(spec, routed_ids, routed_weights))
            tokens, counts, gates = _pairs_from_dense(spec, weights, chosen)
    else:
        logits = router_logits(x, w.router_weight, w.router_bias)
        weights, chosen = map_experts(spec, *route(spec, logits, w.selection_bias))
        tokens, counts, gates = _pairs_from_dense(spec, weights, chosen)
    if experts is None:
        grouped = experts_kernel(spec.lowering)
        kernel_spec, kernel_weights = spec, w  # grouped_experts dequantises its chosen experts
        if grouped is not grouped_experts:  # kernels on stacked weights read the float block
            kernel_spec, kernel_weights = dequantized_block(spec, w)
        experts = functools.partial(
            gather_experts_scatter, functools.partial(grouped, kernel_spec, kernel_weights)
        )
    if spec.gate_on_input:
        experts = functools.partial(_gating_inputs, experts)
    flat_x = x.reshape(-1, x.shape[-1])
    out = shared(flat_x) if shared else shared_ffn(spec, w, flat_x)
    if tokens.numel():
        out = experts(out, flat_x, tokens, counts.tolist(), gates.to(x.dtype))
    if w.output_bias is not None:
        out = out + w.output_bias
    return carry_nonfinite(out, flat_x).reshape(x.shape), chosen


def carry_nonfinite(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` [T, H] with NaN in every token whose input ``x`` [T, H] is not finite, as the
    eager block gives (routing may hand such a token no expert, or a capacity no slot)."""
    return out + (x * 0).sum(-1, keepdim=True)


def gather_experts_scatter(
    experts, out: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor, counts, gates
) -> torch.Tensor:
    """`moe_eager`'s ``experts`` step from ``experts(rows [P, H], counts) -> [P, H]`` on rows
    grouped by expert: one gather in, one matmul chain per expert on its own tokens, one
    scatter-add out."""
    rows = x.index_select(0, tokens)
    return out.index_add(0, tokens, experts(rows, counts) * gates.unsqueeze(-1))


def _gating_inputs(experts, out: torch.Tensor, x: torch.Tensor, tokens, counts, gates):
    """The ``experts`` step of a ``gate_on_input`` block from any ``experts`` step: each pair's
    row is its token times its gate, run with gate 1, and added back at its token."""
    rows = x.index_select(0, tokens) * gates.unsqueeze(-1)
    pairs = torch.arange(len(tokens), device=x.device)
    routed = experts(torch.zeros_like(rows), rows, pairs, counts, torch.ones_like(gates))
    return out.index_add(0, tokens, routed)


def _pairs_from_dense(spec: MoESpec, weights: torch.Tensor, chosen: torch.Tensor):
    """The (token, expert) pairs of dense routing, grouped by expert (tokens ascending):
    (tokens [P], counts [E], gates [P] float32)."""
    expert_ids, tokens = chosen.reshape(-1, spec.num_experts).t().nonzero().unbind(1)
    gates = weights.reshape(-1, spec.num_experts)[tokens, expert_ids]
    return tokens, torch.bincount(expert_ids, minlength=spec.num_experts), gates


def _pairs_from_ids(spec: MoESpec, ids: torch.Tensor, weights: torch.Tensor):
    """`_pairs_from_dense` for routing given as top-k ids and weights, grouped from the ids
    with one stable sort instead of scattering them into dense [T, E] tensors and finding the
    nonzeros again (at a few tokens the torch target's time is mostly small ops). With distinct
    ids per token these are the same pairs in the same order (by expert, then token), so the
    result is bit-for-bit the same. Each slot is a pair: an expert that a family's router
    repeats within a token (hash routing) runs once per slot and its outputs add up, as the
    family's loop adds them (the dense path computes it once with the summed weight).
    Returns (chosen [..., E], pairs)."""
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    tokens = order.div(ids.shape[-1], rounding_mode="floor")
    gates = weights.reshape(-1).index_select(0, order).float()
    pairs = (tokens, torch.bincount(flat, minlength=spec.num_experts), gates)
    return chosen_from_ids(spec, ids), pairs


def scatter_routing(
    spec: MoESpec, ids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing given as (ids, weights) [..., k] -> dense weights and chosen mask [..., E]. A
    family's router may repeat an expert within a token (hash routing): its weights add up,
    as its loop over slots adds the expert's output once per slot."""
    dense = torch.zeros(
        (*ids.shape[:-1], spec.router_experts), dtype=torch.float32, device=ids.device
    )
    return dense.scatter_add(-1, ids, weights.float()), chosen_from_ids(spec, ids)


def chosen_from_ids(spec: MoESpec, ids: torch.Tensor) -> torch.Tensor:
    """Top-k ids [..., k] -> which of the router's experts each token chose, bool [..., E]."""
    shape = (*ids.shape[:-1], spec.router_experts)
    return torch.zeros(shape, dtype=torch.bool, device=ids.device).scatter(-1, ids, True)


@torch.library.custom_op("moec::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    routed_ids: torch.Tensor | None,
    routed_weights: torch.Tensor | None,
    router_weight: torch.Tensor | None,
    router_bias: torch.Tensor | None,
    selection_bias: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    shared_gate: torch.Tensor | None,
    shared_up: torch.Tensor | None,
    shared_down: torch.Tensor | None,
    shared_expert_gate: torch.Tensor | None,
    output_bias: torch.Tensor | None,
    post_norm_weight: torch.Tensor | None,
    w_gate_scale: torch.Tensor | None,
    w_up_scale: torch.Tensor | None,
    w_down_scale: torch.Tensor | None,
    w_gate_zero: torch.Tensor | None,
    w_up_zero: torch.Tensor | None,
    w_down_zero: torch.Tensor | None,
    spec_json: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = parse_spec(spec_json)
    args = locals()
    weights = MoEWeights(**{name: args[name] for name in WEIGHT_NAMES})
    if spec.expert_kind == "module":
        raise SpecError("moec::moe runs FFN experts; module experts run as their own subgraphs")
    if x.dim() not in (2, 3) or x.shape[-1] != spec.hidden_size:
        raise SpecError(
            f"moec::moe: input of shape {tuple(x.shape)}; expected [B, S, {spec.hidden_size}] "
            f"or [T, {spec.hidden_size}]"
        )
    return moe_eager(spec, weights, x, routed_ids, routed_weights)


@moe.register_fake
def _moe_fake(x, *args):
    spec = parse_spec(args[-1])
    chosen = x.new_empty((*x.shape[:-1], spec.num_experts), dtype=torch.bool)
    return torch.empty_like(x), chosen
