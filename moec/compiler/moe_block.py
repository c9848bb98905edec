"""`MoEBlock`: the module capture puts in place of a recognised MoE block.

Its forward is one call to ``torch.ops.moec.moe``, so the exported graph holds one node per
block with the stacked expert weights as parameters. The routing mask the op returns is appended
to ``routing_sink`` when capture sets one, for the capture wrapper to expose as an output.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moec.ir import WEIGHT_NAMES, MoESpec, MoEWeights, router_logits
from moec.ir.moe_op import MoEOpArgs
from moec.models.conversion import Conversion
from moec.models.generic_moe import module_experts_forward

__all__ = [
    "ROUTER_WEIGHTS",
    "GatedMoEBlock",
    "MoEBlock",
    "MoEExpertsBlock",
    "MoELogitsBlock",
    "ModuleExpertsBlock",
    "cast_keeping_routers",
    "experts_call_args",
    "op_block",
]


class MoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, weights: MoEWeights):
        super().__init__()
        weights.check(spec)
        self.spec = spec
        self.spec_json = spec.to_json()
        for name in WEIGHT_NAMES:
            tensor = getattr(weights, name)
            param = None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)
            self.register_parameter(name, param)
        self.routing_sink: list[torch.Tensor] | None = None

    def to_moe(self) -> tuple[MoESpec, MoEWeights]:
        """The block's IR, so that a model built from MoEBlocks is recognised like any other."""
        tensors = {name: getattr(self, name) for name in WEIGHT_NAMES}
        weights = MoEWeights(**{k: None if v is None else v.detach() for k, v in tensors.items()})
        return dataclasses.replace(self.spec, lowering=None), weights

    def call_op(self, x, routed_ids=None, routed_weights=None) -> torch.Tensor:
        """``torch.ops.moec.moe`` on this block's weights and spec; records the routing."""
        weights = {name: getattr(self, name) for name in WEIGHT_NAMES}
        args = MoEOpArgs(x, routed_ids, routed_weights, weights, self.spec_json)
        out, chosen = torch.ops.moec.moe(*args.to_args())
        if self.routing_sink is not None:
            self.routing_sink.append(chosen)
        return out

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``padding_mask``: the mask NLLB-MoE passes its blocks, which only withholds experts
        from padded tokens (whose outputs are not defined); the op routes every token."""
        return self.call_op(x)


def experts_call_args(args: tuple, kwargs: dict) -> tuple:
    """(hidden_states, top_k_index, top_k_weights) of a call to a transformers experts module,
    positional or by keyword (some families name them ``router_indices``/``routing_weights``)."""

    def pick(i: int, *names: str):
        if len(args) > i:
            return args[i]
        return next((kwargs[n] for n in names if kwargs.get(n) is not None), None)

    return (
        pick(0, "hidden_states"),
        pick(1, "top_k_index", "router_indices"),
        pick(2, "top_k_weights", "routing_weights"),
    )


class MoEExpertsBlock(MoEBlock):
    """Stands in for a transformers experts module: the family's router stays in the graph and
    hands over ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``."""

    def forward(self, *args, **kwargs):
        hidden_states, top_k_index, top_k_weights = experts_call_args(args, kwargs)
        tokens = hidden_states.reshape(*top_k_index.shape[:-1], hidden_states.shape[-1])
        return self.call_op(tokens, top_k_index, top_k_weights).reshape(hidden_states.shape)


class GatedMoEBlock(MoEBlock):
    """Stands in for a block routed by its own code: ``gate`` (`GateReader`) computes the op's
    inputs with the block's own ops; the op runs the experts. With ``returns_router_logits``
    the gate also returns the block's router logits, and the stand-in returns ``(out, logits)``
    as the block did."""

    def __init__(
        self, spec: MoESpec, weights: MoEWeights, gate: nn.Module, returns_router_logits=False
    ):
        super().__init__(spec, weights)
        self.gate = gate
        self.returns_router_logits = returns_router_logits

    def forward(self, *args, **kwargs):
        tokens, ids, gates, rest, *logits = self.gate(*args, **kwargs)
        out = self.call_op(tokens, ids, gates).reshape(rest.shape) + rest
        return (out, *logits) if self.returns_router_logits else out


class MoELogitsBlock(MoEBlock):
    """Stands in for a block that returns ``(out [T, H], router_logits [T, E])`` (Llama 4): the
    logits, in the input's dtype, are for callers that record them and are dropped otherwise."""

    def to_moe(self) -> Conversion:
        return Conversion(*super().to_moe(), returns_router_logits=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        logits = router_logits(flat, self.router_weight, self.router_bias).to(x.dtype)
        return self.call_op(x).reshape(flat.shape), logits


class ModuleExpertsBlock(MoEBlock):
    """A block whose experts are arbitrary modules: routed by the IR's routing, each expert's
    tokens gathered, run through the expert's own (exported) module, and scatter-added back."""

    def __init__(self, spec: MoESpec, weights: MoEWeights, experts: nn.ModuleList):
        super().__init__(spec, weights)
        self.experts = experts

    def to_moe(self):
        spec, weights = super().to_moe()
        return spec, weights, self.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = MoEWeights(**{name: getattr(self, name) for name in WEIGHT_NAMES})
        out, chosen = module_experts_forward(self.spec, weights, self.experts, x)
        if self.routing_sink is not None:
            self.routing_sink.append(chosen)
        return out


def op_block(
    spec: MoESpec,
    weights: MoEWeights,
    expert_modules: nn.ModuleList | None = None,
    gate: nn.Module | None = None,
    returns_router_logits: bool = False,
) -> MoEBlock:
    """The module standing in for a converted block (whole block, experts only, module experts,
    a block routed by its own code, a whole block that also returns its router logits)."""
    if expert_modules is not None:
        return ModuleExpertsBlock(spec, weights, expert_modules)
    if gate is not None:
        return GatedMoEBlock(spec, weights, gate, returns_router_logits)
    if returns_router_logits:
        return MoELogitsBlock(spec, weights)
    cls = MoEExpertsBlock if spec.routing == "external" else MoEBlock
    return cls(spec, weights)


ROUTER_WEIGHTS = ("router_weight", "router_bias", "selection_bias")  # kept in float32


def cast_keeping_routers(root: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``root`` with its floating parameters and buffers in ``dtype``, in place, except the
    routers of its `MoEBlock`s, which stay float32: the op routes in float32, and a router
    rounded to half precision would choose other experts."""
    blocks = [m for m in root.modules() if isinstance(m, MoEBlock)]
    kept = [{n: getattr(b, n) for n in ROUTER_WEIGHTS if getattr(b, n) is not None} for b in blocks]
    root.to(dtype)
    for block, routers in zip(blocks, kept, strict=True):
        for name, tensor in routers.items():
            setattr(block, name, nn.Parameter(tensor.detach().float(), requires_grad=False))
    return root
