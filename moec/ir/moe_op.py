"""The `moec::moe` operator: one MoE block as one node of an exported graph.

``torch.ops.moec.moe(x, routed_ids, routed_weights, *MoEWeights.args(), spec_json)
-> (out, chosen)``

- ``x``: [B, S, H] or [T, H] (a 2-D input is one sequence), float32/float16/bfloat16.
- ``routed_ids`` int64 [..., k] and ``routed_weights`` [..., k]: the routing, when the block's
  own router computed it (``spec.routing == "external"``); None otherwise.
- weights, in the order of `WEIGHT_NAMES` (optional ones may be None):
  ``router_weight`` [E, H] (None for external routing), ``router_bias`` [E], ``selection_bias`` [E],
  ``w_gate`` [E, I, H] (gated experts only), ``w_up`` [E, I, H], ``w_down`` [E, H, I],
  ``b_gate`` [E, I], ``b_up`` [E, I], ``b_down`` [E, H],
  ``shared_gate`` [Is, H], ``shared_up`` [Is, H], ``shared_down`` [H, Is],
  ``shared_expert_gate`` [1, H], ``output_bias`` [H] (added to every token's output).
- ``spec_json``: `MoESpec.to_json()`.
- ``out``: like ``x``; ``chosen``: bool [..., E], which experts serve each token (the routing,
  exposed so that verification can compare it).

The eager kernel routes in float32 and runs each expert on its own tokens only. It is the
reference every lowering is checked against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from moec.errors import SpecError
from moec.ir.moe_spec import MoESpec
from moec.ir.routing import map_experts, route, router_logits

__all__ = [
    "PLAIN_ACTIVATION_FUNCTIONS",
    "WEIGHT_NAMES",
    "MoEWeights",
    "chosen_from_ids",
    "expert_ffn",
    "expert_hidden",
    "expert_segments",
    "gated_activation",
    "gather_experts_scatter",
    "grouped_experts",
    "grouped_mm_experts",
    "linear",
    "moe_eager",
    "onednn_linear",
    "scatter_routing",
    "shared_ffn",
]


@dataclass
class MoEWeights:
    """The tensors of one MoE block, stacked with the expert index first (see module doc)."""

    router_weight: torch.Tensor | None
    w_up: torch.Tensor | None
    w_down: torch.Tensor | None
    router_bias: torch.Tensor | None = None
    selection_bias: torch.Tensor | None = None
    w_gate: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None
    shared_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None
    shared_expert_gate: torch.Tensor | None = None
    output_bias: torch.Tensor | None = None

    def args(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(getattr(self, name) for name in WEIGHT_NAMES)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t) for n in WEIGHT_NAMES if (t := getattr(self, n)) is not None]

    @staticmethod
    def expected_shapes(spec: MoESpec) -> dict[str, tuple[int, ...] | None]:
        """The shape ``spec`` implies for each tensor (None: the block has no use for it)."""
        e, h, i, s = spec.num_experts, spec.hidden_size, spec.expert_size, spec.shared_expert_size
        r = spec.router_experts
        routed = spec.routing != "external"
        ffn = spec.expert_kind != "module"
        gated = spec.expert_kind == "gated"
        return {
            "router_weight": (r, h) if routed else None,
            "router_bias": (r,) if routed else None,
            "selection_bias": (r,) if routed else None,
            "w_gate": (e, i, h) if gated else None,
            "w_up": (e, i, h) if ffn else None,
            "w_down": (e, h, i) if ffn else None,
            "b_gate": (e, i) if gated else None,
            "b_up": (e, i) if ffn else None,
            "b_down": (e, h) if ffn else None,
            "shared_gate": (s, h) if s else None,
            "shared_up": (s, h) if s else None,
            "shared_down": (h, s) if s else None,
            "shared_expert_gate": (1, h) if spec.shared_expert_gated else None,
            "output_bias": (h,),
        }

    @staticmethod
    def required(spec: MoESpec) -> set[str]:
        """The tensors ``spec`` cannot do without."""
        required = {"router_weight"} if spec.routing != "external" else set()
        if spec.expert_kind != "module":
            required |= {"w_up", "w_down"}
        if spec.expert_kind == "gated":
            required.add("w_gate")
        if spec.shared_expert_size:
            required |= {"shared_gate", "shared_up", "shared_down"}
        if spec.shared_expert_gated:
            required.add("shared_expert_gate")
        return required

    def check(self, spec: MoESpec) -> None:
        """Raise SpecError unless every tensor has the shape ``spec`` implies."""
        expected, required = self.expected_shapes(spec), self.required(spec)
        for name in WEIGHT_NAMES:
            tensor, shape = getattr(self, name), expected[name]
            if tensor is None:
                if name in required:
                    raise SpecError(f"MoE weights: {name} is required by {spec.summary()}")
                continue
            if shape is None:
                raise SpecError(
                    f"MoE weights: {name} given, but {spec.summary()} has no use for it"
                )
            if tuple(tensor.shape) != shape:
                raise SpecError(
                    f"MoE weights: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"for {spec.summary()} (hidden {spec.hidden_size})"
                )


WEIGHT_NAMES: tuple[str, ...] = (
    "router_weight",
    "router_bias",
    "selection_bias",
    "w_gate",
    "w_up",
    "w_down",
    "b_gate",
    "b_up",
    "b_down",
    "shared_gate",
    "shared_up",
    "shared_down",
    "shared_expert_gate",
    "output_bias",
)
assert set(WEIGHT_NAMES) == {f.name for f in fields(MoEWeights)}


PLAIN_ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    return PLAIN_ACTIVATION_FUNCTIONS[name](x)


ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x [n, in] @ weight [out, in].T (+ bias [out]).

    Without autograd, float32 runs oneDNN's GEMM on the dense weight in place, which beat
    ``F.linear`` (MKL) with 2 threads at every row count from 1 to 512 on an AVX-512 Xeon
    (1.5-2.5x) and at one row on an AMD EPYC (1.4-1.7x), but not on an AMX Xeon: there MKL
    was faster up to 4 rows (six of config B's experts: 0.93 against 1.41 ms at one row, 0.88
    against 2.02 at two) and slower from 16 (4.2 against 3.6 ms). Which library wins is a
    property of the host, not of the block; oneDNN stays the one choice here (a loaded torch
    artifact's packed weights measure it: `moec.runtime.packed_gemm`). Anything else takes
    ``F.linear``."""
    if (
        ONEDNN
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x [n, in] @ weight.T (+ bias) with oneDNN's GEMM; ``weight`` dense [out, in] or packed
    by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


# the dtypes torch._grouped_mm multiplies; its strides must be multiples of 16 bytes
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPED_MM_ALIGN = 8  # elements: hidden and expert sizes divisible by this suit every dtype


def _at(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


def gated_activation(spec: MoESpec, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated experts' activation of ``spec`` on gate and up projections of one shape."""
    if spec.activation == "swiglu":
        if spec.swiglu_limit is not None:
            gate = gate.clamp(max=spec.swiglu_limit)
            up = up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
        return gate * torch.sigmoid(spec.swiglu_alpha * gate) * (up + spec.swiglu_beta)
    if spec.activation_limit is not None:
        limit = spec.activation_limit
        return _act(spec.activation, gate).clamp(max=limit) * up.clamp(-limit, limit)
    return _act(spec.activation, gate) * up


def expert_hidden(
    spec: MoESpec, w: MoEWeights, e: int, rows: torch.Tensor, project=F.linear
) -> torch.Tensor:
    """Expert ``e``'s activations before its down projection: [n, H] -> [n, I], with
    ``project(x, weight [out, in], bias [out] | None)``."""
    up = project(rows, w.w_up[e], _at(w.b_up, e))
    if spec.expert_kind == "plain":
        return _act(spec.activation, up)
    return gated_activation(spec, project(rows, w.w_gate[e], _at(w.b_gate, e)), up)


def expert_ffn(spec: MoESpec, w: MoEWeights, e: int, rows: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on its tokens ``rows`` [n, H] -> [n, H]."""
    return linear(expert_hidden(spec, w, e, rows, linear), w.w_down[e], _at(w.b_down, e))


def grouped_experts(spec: MoESpec, w: MoEWeights, rows: torch.Tensor, counts: list[int]):
    """Each expert on its rows: ``rows`` [P, H] grouped by expert, ``counts[e]`` of them for
    expert e -> [P, H] in the same order."""
    return torch.cat([expert_ffn(spec, w, e, part) for e, part in expert_segments(rows, counts)])


def grouped_mm_experts(spec: MoESpec, w: MoEWeights, rows: torch.Tensor, counts: list[int]):
    """`grouped_experts` with one ``torch._grouped_mm`` per projection over every expert's rows
    (the stacked weights read in place, as transformers' ``grouped_mm`` does), for float32,
    bfloat16 and float16 rows (``torch._grouped_mm``'s dtypes; others take the per-expert loop).
    """
    if rows.dtype not in GROUPED_MM_DTYPES:
        return grouped_experts(spec, w, rows, counts)
    sizes = torch.tensor(counts)
    offs = sizes.cumsum(0, dtype=torch.int32)  # where each expert's rows end

    def project(x, weight, bias):  # x [P, in] @ weight[e] [out, in].T per segment (+ bias[e])
        out = torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)
        return out if bias is None else out + bias.repeat_interleave(sizes, dim=0)

    up = project(rows, w.w_up, w.b_up)
    if spec.expert_kind == "plain":
        hidden = _act(spec.activation, up)
    else:
        hidden = gated_activation(spec, project(rows, w.w_gate, w.b_gate), up)
    return project(hidden, w.w_down, w.b_down)


def expert_segments(rows: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(e, expert e's rows) for each expert with rows, from ``rows`` grouped by expert."""
    active = [e for e, n in enumerate(counts) if n]  # most experts are idle at a few tokens
    return list(zip(active, rows.split([counts[e] for e in active]), strict=True))


def shared_ffn(spec: MoESpec, w: MoEWeights, x: torch.Tensor, project=linear) -> torch.Tensor:
    """The shared expert on every token: [n, H] -> [n, H] (zero when the block has none), with
    ``project(x, weight [out, in])`` (default: the fastest here, not exportable)."""
    if not spec.shared_expert_size:
        return torch.zeros_like(x)
    hidden = _act(spec.shared_activation, project(x, w.shared_gate)) * project(x, w.shared_up)
    out = project(hidden, w.shared_down)
    if spec.shared_expert_gated:
        out = out * torch.sigmoid(F.linear(x, w.shared_expert_gate))
    return out


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
    computes the shared expert. Defaults: `shared_ffn`, and `gather_experts_scatter` with
    `grouped_mm_experts` for a block lowered to ``grouped_mm``, `grouped_experts` otherwise, on
    ``w``; only the routing tensors of ``w`` are read otherwise."""
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
        grouped = grouped_mm_experts if spec.lowering == "grouped_mm" else grouped_experts
        experts = functools.partial(gather_experts_scatter, functools.partial(grouped, spec, w))
    flat_x = x.reshape(-1, x.shape[-1])
    out = shared(flat_x) if shared else shared_ffn(spec, w, flat_x)
    if tokens.numel():
        out = experts(out, flat_x, tokens, counts.tolist(), gates.to(x.dtype))
    if w.output_bias is not None:
        out = out + w.output_bias
    return out.reshape(x.shape), chosen


def gather_experts_scatter(
    experts, out: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor, counts, gates
) -> torch.Tensor:
    """`moe_eager`'s ``experts`` step from ``experts(rows [P, H], counts) -> [P, H]`` on rows
    grouped by expert: one gather in, one matmul chain per expert on its own tokens, one
    scatter-add out."""
    rows = x.index_select(0, tokens)
    return out.index_add(0, tokens, experts(rows, counts) * gates.unsqueeze(-1))


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


@functools.lru_cache(maxsize=256)
def _parse_spec(spec_json: str) -> MoESpec:
    return MoESpec.from_json(spec_json)


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
    spec_json: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _parse_spec(spec_json)
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
    spec = _parse_spec(args[-1])
    chosen = x.new_empty((*x.shape[:-1], spec.num_experts), dtype=torch.bool)
    return torch.empty_like(x), chosen
