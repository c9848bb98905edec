"""The generic recogniser: a router ``nn.Linear`` plus an ``nn.ModuleList`` of identical experts.

Written for MoE blocks users write themselves. Nothing about the block's forward is assumed
beyond ``out = sum over chosen experts e of weight_e * expert_e(x)``; what the routing is, and
what each expert computes, is found by probing the block on random inputs:

- routing: softmax or sigmoid scores, top-k (k = 1 .. 8) with or without renormalisation, or
  top-k of the logits then softmax; the candidate whose output matches the block's is taken;
- experts: a module of two Linears (``down(act(up(x)))``) or three (``down(act(gate(x)) * up(x))``)
  that matches one of moec's activations becomes stacked FFN weights; any other module (attention
  experts, ...) is kept as it is and runs through the exact gather -> module -> scatter path.

A block that matches no candidate is reported with the reason; register an adapter for it
(docs/adapters.md).
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
from torch import nn

from moec.errors import UnsupportedBlockError
from moec.ir import (
    PLAIN_ACTIVATION_FUNCTIONS,
    MoESpec,
    MoEWeights,
    moe_eager,
    route,
    router_logits,
)

__all__ = [
    "GenericMoEAdapter",
    "as_ffn",
    "expert_list",
    "module_experts_forward",
    "takes_more_than_hidden_states",
]

PROBE_TOKENS = 48
MAX_PROBED_TOP_K = 8
PROBE_RTOL = 1e-5


class GenericMoEAdapter:
    name = "generic"

    def convert(self, module: nn.Module) -> tuple[MoESpec, MoEWeights] | None:
        parts = _router_and_experts(module)
        if parts is None or takes_more_than_hidden_states(module):
            return None
        router, experts = parts
        hidden, num_experts = router.in_features, router.out_features
        base: dict[str, Any] = {"num_experts": num_experts, "hidden_size": hidden}
        ffn = as_ffn(experts, hidden)
        if ffn is None:
            weights = MoEWeights(router_weight=None, w_up=None, w_down=None)
            base.update(expert_kind="module", expert_size=1)
        else:
            fields, weights = ffn
            base.update(fields, expert_size=weights.w_up.shape[1])
        weights.router_weight = router.weight.detach()
        weights.router_bias = None if router.bias is None else router.bias.detach()
        module_experts = None if ffn else experts
        spec = _probe_routing(module, base, weights, module_experts)
        return spec, weights, module_experts


MOE_WORDS = ("expert", "moe", "mixture", "sparse")


def _router_and_experts(module: nn.Module) -> tuple[nn.Linear, nn.ModuleList] | None:
    """The router and the experts, if the module is shaped and named like an MoE block."""
    experts = expert_list(module)
    if experts is None:
        return None
    routers = [
        c for c in module.children() if isinstance(c, nn.Linear) and c.out_features == len(experts)
    ]
    return (routers[0], experts) if len(routers) == 1 else None


def expert_list(module: nn.Module) -> nn.ModuleList | None:
    """A child ModuleList of two or more identical experts, named like an MoE's, or None."""
    for name, child in module.named_children():
        if not isinstance(child, nn.ModuleList) or len(child) < 2:
            continue
        if not any(w in f"{name} {type(module).__name__}".lower() for w in MOE_WORDS):
            continue
        first = child[0]
        shapes = [tuple(p.shape) for p in first.parameters()]
        same = all(
            type(e) is type(first) and [tuple(p.shape) for p in e.parameters()] == shapes
            for e in child
        )
        if same and shapes:
            return child
    return None


def takes_more_than_hidden_states(module: nn.Module) -> bool:
    """Whether the module's forward needs more than one argument (a context, a task id, a
    mask): the generic recogniser, which calls it on hidden states alone, cannot probe it."""
    params = inspect.signature(module.forward).parameters.values()
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) > 1


def _linears(expert: nn.Module) -> list[nn.Linear]:
    return [m for m in expert.modules() if isinstance(m, nn.Linear)]


def _ffn_candidates(expert: nn.Module, hidden: int):
    """(fields, weight getter, function) for each FFN reading of an expert's Linears."""
    lins = _linears(expert)
    ins = [lin for lin in lins if lin.in_features == hidden]
    outs = [lin for lin in lins if lin.out_features == hidden and lin.in_features != hidden]
    if len(lins) == 2 and len(ins) == 1 and len(outs) == 1:
        up, down = ins[0], outs[0]
        for name, act in PLAIN_ACTIVATION_FUNCTIONS.items():
            yield (
                {"expert_kind": "plain", "activation": name},
                (None, up, down),
                (lambda x, act=act: down(act(up(x)))),
            )
    if len(lins) == 3 and len(ins) == 2 and len(outs) == 1:
        down = outs[0]
        for gate, up in itertools.permutations(ins):
            for name, act in PLAIN_ACTIVATION_FUNCTIONS.items():
                yield (
                    {"expert_kind": "gated", "activation": name},
                    (gate, up, down),
                    (lambda x, act=act, gate=gate, up=up: down(act(gate(x)) * up(x))),
                )


def _matching_ffn(expert: nn.Module, hidden: int):
    x = torch.randn(PROBE_TOKENS, hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        try:
            ref = expert(x)
        except Exception:  # an expert that needs more than x is not an FFN
            return None
        for fields, layers, fn in _ffn_candidates(expert, hidden):
            if torch.allclose(fn(x), ref, rtol=PROBE_RTOL, atol=1e-6):
                return fields, layers
    return None


def as_ffn(experts: nn.ModuleList, hidden: int) -> tuple[dict[str, Any], MoEWeights] | None:
    """Spec fields and stacked weights when every expert is the same kind of FFN, else None."""
    matches = [_matching_ffn(e, hidden) for e in experts]
    if any(m is None for m in matches) or len({str(m[0]) for m in matches}) != 1:
        return None

    def stack(i: int, attr: str) -> torch.Tensor | None:
        tensors = [getattr(m[1][i], attr) for m in matches]
        return None if tensors[0] is None else torch.stack([t.detach() for t in tensors])

    gated = matches[0][0]["expert_kind"] == "gated"
    return matches[0][0], MoEWeights(
        router_weight=None,
        w_gate=stack(0, "weight") if gated else None,
        w_up=stack(1, "weight"),
        w_down=stack(2, "weight"),
        b_gate=stack(0, "bias") if gated else None,
        b_up=stack(1, "bias"),
        b_down=stack(2, "bias"),
    )


def module_experts_forward(
    spec: MoESpec, weights: MoEWeights, experts: nn.ModuleList, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route with the IR, then gather each expert's tokens, run the module, scatter-add back."""
    logits = router_logits(x, weights.router_weight, weights.router_bias)
    dense, chosen = route(spec, logits, weights.selection_bias)
    flat_x = x.reshape(-1, x.shape[-1])
    flat_w = dense.reshape(-1, spec.num_experts).to(x.dtype)
    flat_chosen = chosen.reshape(-1, spec.num_experts)
    out = torch.zeros_like(flat_x)
    for e, expert in enumerate(experts):
        tokens = flat_chosen[:, e].nonzero().squeeze(-1)
        out = out.index_add(0, tokens, expert(flat_x[tokens]) * flat_w[tokens, e, None])
    return out.reshape(x.shape), chosen


def _routing_candidates(base: dict[str, Any]):
    top_ks = range(1, min(base["num_experts"], MAX_PROBED_TOP_K) + 1)
    for k in top_ks:
        for score, norm in itertools.product(("softmax", "sigmoid"), (False, True)):
            yield {**base, "top_k": k, "score": score, "norm_topk_prob": norm}
        yield {**base, "top_k": k, "topk_before_softmax": True}


def _probe_routing(
    module: nn.Module, base: dict[str, Any], weights: MoEWeights, experts: nn.ModuleList | None
) -> MoESpec:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, PROBE_TOKENS, base["hidden_size"], generator=g)
    with torch.no_grad():
        try:
            ref = module(x)
        except Exception as e:  # a forward that needs more than [B, S, H] is not for us
            raise UnsupportedBlockError(
                f"calling it on hidden states [1, {PROBE_TOKENS}, {base['hidden_size']}] failed "
                f"({type(e).__name__}: {e}); register an adapter for it (docs/adapters.md)"
            ) from e
        if not isinstance(ref, torch.Tensor):
            raise UnsupportedBlockError(
                f"it returns a {type(ref).__name__}; the generic recogniser replaces blocks that "
                "return the MoE output tensor only: register an adapter for it (docs/adapters.md)"
            )
        tried = 0
        for fields in _routing_candidates(base):
            spec = MoESpec(**fields)
            tried += 1
            if experts is None:
                out, _ = moe_eager(spec, weights, x)
            else:
                out, _ = module_experts_forward(spec, weights, experts, x)
            if out.shape == ref.shape and torch.allclose(out, ref, rtol=PROBE_RTOL, atol=1e-6):
                return spec
    raise UnsupportedBlockError(
        f"a router Linear and {base['num_experts']} experts, but its output matches none of the "
        f"{tried} routing styles moec probes (softmax/sigmoid top-k with or without "
        "renormalisation, top-k then softmax); register an adapter for it (docs/adapters.md)"
    )
