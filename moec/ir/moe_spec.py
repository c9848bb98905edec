"""`MoESpec`: the plain-data configuration of one MoE block, as carried by a `moec::moe` node.

Routing (per token, logits = x @ router_weight.T + router_bias, computed in float32):

- ``score``: ``softmax`` over experts, ``sigmoid``, or ``none`` (the logits themselves).
- ``routing="topk"``: pick ``top_k`` experts by score (+ ``selection_bias``, used for choosing
  only), optionally limited to the best ``topk_group`` of ``n_group`` expert groups, a group scored
  by its ``max`` or the sum of its top two (``top2_sum``). With ``topk_before_softmax`` the choice
  is made on the logits and the weights are a softmax over the chosen k logits (GPT-OSS).
  Weights are the scores of the chosen experts, renormalised to sum 1 when ``norm_topk_prob``,
  then multiplied by ``routed_scaling_factor``.
- ``routing="expert_choice"``: every expert takes the tokens with its highest softmax scores,
  ``C = min(S, ceil(capacity_factor * S * top_k / E))`` of each sequence.
- ``routing="external"``: the block's own router (kept in the graph as ordinary ops) gives
  ``top_k`` expert ids and weights per token; the op only runs the experts. Score, group and
  capacity fields do not apply. ``signed_weights``: the weights may be any real number (a
  user's gate moec reads as it is), not only the non-negative scores of a softmax or sigmoid.
- Capacity (top-k routing): with ``expert_capacity`` (a fixed count) or ``capacity_factor``
  (``C = ceil(factor * n * top_k / E)``, n the tokens in scope), each expert serves at most C of
  the (token, slot) pairs routed to it in ``capacity_scope`` (a ``sequence`` or the whole
  ``batch``), in position order; pairs past it contribute nothing.

Experts, stacked with the expert index first:

- ``gated``: ``down(act(gate(x)) * up(x))``; ``swiglu`` is the parameterised form
  ``g = min(gate, limit); u = clamp(up, -limit, limit); g * sigmoid(alpha * g) * (u + beta)``
  (GPT-OSS: alpha 1.702, beta 1, limit 7; DeepSeek-V4: alpha 1, beta 0, a limit; no limit: None).
  ``swiglu_softcap`` bounds the linear factors with tanh softcaps, the sigmoid sees the raw gate:
  ``Cg * tanh(gate / Cg) * sigmoid(gate) * Cu * tanh(up / Cu)`` (Inkling2: ``gate_softcap`` Cg,
  ``up_softcap`` Cu). Any other gated activation may be clamped after it with
  ``activation_limit`` L: ``min(act(gate), L) * clamp(up, -L, L)`` (Step-3.7).
- ``plain``: ``down(act(up(x)))`` (``up`` is the input projection).
- ``post_expert_norm_eps``: each gated or plain expert's output y is RMS-normalised before its
  routing weight scales it, ``y / sqrt(mean(y^2) + eps) * post_norm_weight[e]`` (in float32;
  the weight, [E, H], is optional) (MuseSpark, Ergo).
- ``module``: any nn.Module per expert (attention experts, ...), kept as exported subgraphs and
  run on each expert's own tokens; no stacked weights.

Each (token, expert) pair adds ``weight * expert(x)``; with ``gate_on_input`` it adds
``expert(weight * x)`` instead (Llama 4 scales each expert's input by its router score).

Shared experts: a gated FFN of width ``shared_expert_size`` applied to every token, scaled by
``sigmoid(x @ shared_expert_gate.T)`` when ``shared_expert_gated``.

Compressed blocks (merged or pruned experts): ``expert_map[r]`` is the stored expert that router
expert r's gate goes to (-1: pruned, its pairs contribute nothing). Routing runs over the
``router_experts = len(expert_map)`` experts the router scores; the gates of router experts that
share a stored expert add up. ``num_experts`` is the number of stored experts.

Quantised experts (``weight_bits`` 4 or 8): the stacked expert matrices ``w_gate``/``w_up``/
``w_down`` [E, N, K] hold unsigned codes in [0, 2^bits) (uint8, one per weight), and each has a
float scale per block of ``weight_block_size`` weights along K (None: one per row), [E, N, K/B];
a weight is ``(code - zero) * scale``, the zero point ``2^(bits-1)`` when ``weight_symmetric``,
else stored per block (uint8, ``*_zero``) (`moec.ir.quantized_experts`).

``lowering`` and ``lowering_capacity_factor`` are not part of the model: the lowering passes fill
them in to tell the emitter which registered lowering (`moec.registry`) a block gets (for
``capacity``: the factor F of ``C = min(T, ceil(F * T * k / E))`` slots per expert).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from moec import registry
from moec.errors import SpecError

__all__ = ["ACTIVATIONS", "MoESpec"]

SCORES = ("softmax", "sigmoid", "none")
ROUTINGS = ("topk", "expert_choice", "external")
GROUP_SCORES = ("max", "top2_sum")
CAPACITY_SCOPES = ("sequence", "batch")
EXPERT_KINDS = ("gated", "plain", "module")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu", "swiglu_softcap")
GATED_ONLY = ("swiglu", "swiglu_softcap")
PLAIN_ACTIVATIONS = ACTIVATIONS[:5]


@dataclass(frozen=True)
class MoESpec:
    """Configuration of one MoE block. See the module docstring for the semantics."""

    num_experts: int
    top_k: int
    hidden_size: int
    expert_size: int
    score: str = "softmax"
    routing: str = "topk"
    signed_weights: bool = False
    topk_before_softmax: bool = False
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    expert_capacity: int | None = None
    capacity_factor: float | None = None
    capacity_scope: str = "sequence"
    expert_kind: str = "gated"
    activation: str = "silu"
    swiglu_alpha: float = 1.0
    swiglu_beta: float = 0.0
    swiglu_limit: float | None = None
    activation_limit: float | None = None
    gate_on_input: bool = False
    gate_softcap: float | None = None
    up_softcap: float | None = None
    post_expert_norm_eps: float | None = None
    shared_expert_size: int = 0
    shared_expert_gated: bool = False
    shared_activation: str = "silu"
    expert_map: tuple[int, ...] | None = None
    weight_bits: int | None = None
    weight_block_size: int | None = None
    weight_symmetric: bool = True
    lowering: str | None = None
    lowering_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        if self.expert_map is not None:  # JSON gives a list
            object.__setattr__(self, "expert_map", tuple(int(i) for i in self.expert_map))
        self._validate()

    # -- derived ------------------------------------------------------------------------------
    @property
    def has_capacity(self) -> bool:
        return self.routing == "topk" and (
            self.expert_capacity is not None or self.capacity_factor is not None
        )

    @property
    def router_experts(self) -> int:
        """Experts the router scores (more than ``num_experts`` once experts are merged)."""
        return self.num_experts if self.expert_map is None else len(self.expert_map)

    @property
    def experts_per_group(self) -> int:
        return self.router_experts // self.n_group

    def lowering_capacity(self, tokens: int) -> int:
        """Slots per expert of the ``capacity`` lowering for a call of ``tokens`` tokens."""
        factor = self.lowering_capacity_factor or 1.0
        return min(tokens, math.ceil(factor * tokens * self.top_k / self.num_experts))

    def capacity(self, tokens: int) -> int:
        """Tokens (or, for top-k, token-slot pairs) each expert serves among ``tokens``."""
        if self.routing == "expert_choice":
            factor = 1.0 if self.capacity_factor is None else self.capacity_factor
            return min(tokens, math.ceil(factor * tokens * self.top_k / self.router_experts))
        if self.expert_capacity is not None:
            return self.expert_capacity
        if self.capacity_factor is None:
            raise SpecError("capacity() asked of a block without capacity")
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.router_experts)

    # -- (de)serialisation --------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoESpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"MoESpec has no field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise SpecError(f"MoESpec {data}: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> MoESpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"MoESpec is not valid JSON ({e}): {text[:200]!r}") from e
        return cls.from_dict(data)

    def dequantized(self) -> MoESpec:
        """The spec of the float block a quantised block stands for."""
        return dataclasses.replace(
            self, weight_bits=None, weight_block_size=None, weight_symmetric=True
        )

    def with_lowering(self, lowering: str, capacity_factor: float | None = None) -> MoESpec:
        return dataclasses.replace(
            self, lowering=lowering, lowering_capacity_factor=capacity_factor
        )

    def summary(self) -> str:
        """One line for tables: routing and expert shape."""
        if self.routing == "expert_choice":
            route = f"expert-choice({self.score})"
        elif self.routing == "external":
            route = f"top-{self.top_k} by the block's own router"
        else:
            route = f"top-{self.top_k} {self.score}"
            if self.topk_before_softmax:
                route = f"top-{self.top_k} then softmax"
            if self.n_group > 1:
                route += f", {self.topk_group}/{self.n_group} groups by {self.group_score}"
            if self.norm_topk_prob:
                route += ", renorm"
            if self.has_capacity:
                route += f", capacity/{self.capacity_scope}"
        if self.gate_on_input:
            route += ", gating the input"
        shared = f" + shared {self.shared_expert_size}" if self.shared_expert_size else ""
        act = self.activation
        if self.activation_limit is not None:
            act += f"<={self.activation_limit:g}"
        experts = f"{self.num_experts}x{self.expert_kind} {act} {self.expert_size}"
        if self.expert_kind == "module":
            experts = f"{self.num_experts}x module experts"
        if self.post_expert_norm_eps is not None:
            experts += " post-norm"
        if self.expert_map is not None:
            experts += f" (from {self.router_experts} router experts)"
        if self.weight_bits is not None:
            blocks = self.weight_block_size or "row"
            kind = "symmetric" if self.weight_symmetric else "asymmetric"
            experts += f" int{self.weight_bits}/{blocks} {kind}"
        return f"{route}; {experts}{shared}"

    # -- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise SpecError(f"invalid MoESpec: {what}")

        for name, allowed in (
            ("score", SCORES),
            ("routing", ROUTINGS),
            ("group_score", GROUP_SCORES),
            ("capacity_scope", CAPACITY_SCOPES),
            ("expert_kind", EXPERT_KINDS),
            ("activation", ACTIVATIONS),
        ):
            value = getattr(self, name)
            need(value in allowed, f"{name}={value!r}; expected one of {allowed}")
        need(self.shared_activation in PLAIN_ACTIVATIONS, "shared_activation must be a plain one")
        need(self.swiglu_limit is None or self.swiglu_limit > 0, "swiglu_limit must be > 0")
        need(
            self.activation_limit is None
            or (self.activation_limit > 0 and self.expert_kind == "gated"),
            "activation_limit must be > 0, on gated experts",
        )
        need(
            self.activation_limit is None or self.activation not in GATED_ONLY,
            f"{self.activation} takes no activation_limit (swiglu clamps with swiglu_limit)",
        )
        need(
            self.post_expert_norm_eps is None
            or (self.post_expert_norm_eps > 0 and self.expert_kind != "module"),
            "post_expert_norm_eps must be > 0, on FFN experts",
        )
        softcaps = (self.gate_softcap, self.up_softcap)
        if self.activation == "swiglu_softcap":
            need(all(c is not None and c > 0 for c in softcaps), "softcaps must be > 0")
        else:
            need(softcaps == (None, None), "gate_softcap and up_softcap are swiglu_softcap's")
        need(
            self.lowering is None or self.lowering in registry.lowering_names(),
            f"lowering={self.lowering!r}; registered: {registry.lowering_names()}",
        )
        need(
            self.lowering_capacity_factor is None or self.lowering_capacity_factor > 0,
            "lowering_capacity_factor must be > 0",
        )
        for name in ("num_experts", "top_k", "hidden_size", "expert_size", "n_group", "topk_group"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1")
        need(self.top_k <= self.router_experts, f"top_k={self.top_k} > router experts")
        if self.expert_map is not None:
            need(
                all(-1 <= i < self.num_experts for i in self.expert_map),
                f"expert_map entries must be -1 or stored experts 0..{self.num_experts - 1}",
            )
            need(
                set(range(self.num_experts)) <= set(self.expert_map),
                "every stored expert needs a router expert mapped to it",
            )
        self._validate_quantized(need)
        need(self.shared_expert_size >= 0, "shared_expert_size must be >= 0")
        need(
            not self.shared_expert_gated or self.shared_expert_size > 0,
            "shared_expert_gated needs a shared expert",
        )
        need(
            self.router_experts % self.n_group == 0, "router experts must split into n_group groups"
        )
        need(self.topk_group <= self.n_group, "topk_group > n_group")
        need(
            self.topk_group * self.experts_per_group >= self.top_k,
            "the chosen groups hold fewer than top_k experts",
        )
        need(
            self.group_score != "top2_sum" or self.n_group == 1 or self.experts_per_group >= 2,
            "top2_sum group scores need at least 2 experts per group",
        )
        need(
            not self.topk_before_softmax or self.score == "softmax",
            "topk_before_softmax implies score='softmax'",
        )
        need(
            not self.gate_on_input or self.expert_kind != "module",
            "gate_on_input applies to FFN experts",
        )
        need(
            not self.gate_on_input or self.post_expert_norm_eps is None,
            "gate_on_input blocks have no post-expert norm",
        )
        need(
            self.activation not in GATED_ONLY or self.expert_kind == "gated",
            f"{self.activation} is a gated activation",
        )
        need(
            self.expert_capacity is None or self.capacity_factor is None,
            "give expert_capacity or capacity_factor, not both",
        )
        need(self.expert_capacity is None or self.expert_capacity >= 1, "expert_capacity < 1")
        need(
            self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor must be > 0"
        )
        need(self.routing == "external" or not self.signed_weights, "signed_weights is external")
        if self.routing == "external":
            need(self.n_group == 1, "external routing has no expert groups")
            need(
                self.expert_capacity is None and self.capacity_factor is None,
                "external routing has no capacity",
            )
        if self.routing == "expert_choice":
            need(self.n_group == 1, "expert_choice routing has no expert groups")
            need(self.expert_capacity is None, "expert_choice uses capacity_factor")
            need(self.score == "softmax", "expert_choice routing scores with softmax")

    def _validate_quantized(self, need) -> None:
        if self.weight_bits is None:
            need(self.weight_block_size is None, "weight_block_size needs weight_bits")
            return
        need(self.weight_bits in (4, 8), f"weight_bits={self.weight_bits}; expected 4 or 8")
        need(self.expert_kind != "module", "quantised experts are FFN experts")
        block = self.weight_block_size
        if block is None:
            return
        power_of_2 = block >= 16 and block & (block - 1) == 0
        need(power_of_2, f"weight_block_size={block}: a power of 2, >= 16")
        for name in ("hidden_size", "expert_size"):
            size = getattr(self, name)
            need(size % block == 0, f"weight_block_size={block} does not divide {name}={size}")
