"""Adapter for MoE blocks whose router score scales each expert's input (Llama 4).

Llama 4's ``Llama4TextMoe``: its ``router`` (an nn.Linear) gives dense scores [T, E], the sigmoid
of the top-k logits and 0 elsewhere; every expert runs on every token's row times its score (the
``experts`` module: stacked ``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H] in batched
matmuls over all experts); a ``shared_expert`` (a gated MLP) is added; and the block returns
``(out, router_logits)``. An expert without biases gives 0 on a zero row, so this is top-k
sigmoid routing with ``gate_on_input``, and the block becomes one ``moec::moe`` node whose
experts run on their own tokens only.

Recognised by structure: a router Linear [E, H], an experts module called on the hidden states
alone with ``gate_up_proj`` / ``down_proj`` in that layout, an optional shared expert of
gate/up/down Linears. Nothing declares what the forward does with them, so the block's own
forward runs on random weights and tokens and must match moec's kernel.

Choosing the top-k by sigmoid score is choosing by logit, except where float32's sigmoid
saturates (logits above about 16.6 all score 1.0); verification counts such ties as near-ties.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from moec.errors import UnsupportedBlockError
from moec.ir import MoESpec, MoEWeights, moe_eager
from moec.models.conversion import Conversion
from moec.models.hf_experts import probe_plain_activation

__all__ = ["InputGatedMoEAdapter"]

PROBE_TOKENS = 16
SHARED = ("gate_proj", "up_proj", "down_proj")


class InputGatedMoEAdapter:
    name = "input-gated"

    def convert(self, module: nn.Module) -> Conversion | None:
        parts = _parts(module)
        if parts is None:
            return None
        router, experts, shared = parts
        e, h, two_i = experts.gate_up_proj.shape
        top_k = getattr(module, "top_k", None) or getattr(router, "top_k", None)
        if not isinstance(top_k, int) or not 1 <= top_k <= e:
            raise UnsupportedBlockError(
                f"its top_k ({top_k!r}, read from the block or its router) is not a count of "
                f"its {e} experts; register an adapter for it (docs/adapters.md)"
            )
        spec = MoESpec(
            num_experts=e,
            top_k=top_k,
            hidden_size=h,
            expert_size=two_i // 2,
            score="sigmoid",
            gate_on_input=True,
            activation=probe_plain_activation(_act_fn(experts), two_i // 2),
            shared_expert_size=0 if shared is None else shared.gate_proj.out_features,
            shared_activation="silu" if shared is None else _shared_activation(shared),
        )
        returns_logits = _check_forward(module, spec)
        weights = _weights(lambda name: module.get_parameter(name).detach(), shared is not None)
        return Conversion(spec, weights, returns_router_logits=returns_logits)


def _parts(m: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Module | None] | None:
    """(router, experts, shared expert or None) of a block shaped like Llama 4's, else None."""
    router, experts = getattr(m, "router", None), getattr(m, "experts", None)
    if not isinstance(router, nn.Linear) or not isinstance(experts, nn.Module):
        return None
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (gate_up, down)):
        return None
    if len(inspect.signature(experts.forward).parameters) != 1:
        return None  # experts handed their routing are the fused experts adapter's
    e, h, two_i = gate_up.shape
    if (router.out_features, router.in_features) != (e, h) or down.shape != (e, two_i // 2, h):
        return None
    if router.bias is not None:
        raise UnsupportedBlockError("its router has a bias; register an adapter for it")
    shared = getattr(m, "shared_expert", None)
    if shared is not None and not all(
        isinstance(getattr(shared, n, None), nn.Linear) and getattr(shared, n).bias is None
        for n in SHARED
    ):
        raise UnsupportedBlockError(
            "its shared_expert is not gate_proj/up_proj/down_proj Linears without biases; "
            "register an adapter for it (docs/adapters.md)"
        )
    return router, experts, shared


def _act_fn(module: nn.Module):
    return next(getattr(module, n) for n in ("act_fn", "activation_fn") if hasattr(module, n))


def _shared_activation(shared: nn.Module) -> str:
    return probe_plain_activation(_act_fn(shared), shared.gate_proj.out_features)


def _weights(param: Callable[[str], torch.Tensor], has_shared: bool) -> MoEWeights:
    """The IR's weights from the block's parameters, by qualified name."""
    gate, up = param("experts.gate_up_proj").transpose(1, 2).chunk(2, dim=1)  # [E, I, H] each
    weights = MoEWeights(
        router_weight=param("router.weight"),
        w_gate=gate,
        w_up=up,
        w_down=param("experts.down_proj").transpose(1, 2),
    )
    if has_shared:
        weights.shared_gate, weights.shared_up, weights.shared_down = (
            param(f"shared_expert.{n}.weight") for n in SHARED
        )
    return weights


def _check_forward(module: nn.Module, spec: MoESpec) -> bool:
    """Run the block's own forward with random weights against moec's kernel on the same
    weights; raise if they differ. Returns whether the block also returns its router logits."""
    g = torch.Generator().manual_seed(0)
    dtype = module.router.weight.dtype
    random = {
        name: (torch.randn(p.shape, generator=g) * spec.hidden_size**-0.5).to(dtype)
        for name, p in module.named_parameters()
    }
    x = torch.randn(PROBE_TOKENS, spec.hidden_size, generator=g).to(dtype)
    weights = _weights(random.__getitem__, spec.shared_expert_size > 0)
    with torch.no_grad():
        theirs = functional_call(module, random, (x,))
        logits = None
        if isinstance(theirs, tuple) and len(theirs) == 2:
            theirs, logits = theirs
        ours = moe_eager(spec, weights, x)[0]
        expected_logits = x @ weights.router_weight.T
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    error = _rel_l2(ours, theirs.reshape(ours.shape))
    if logits is not None and not _rel_l2(expected_logits, logits) <= tolerance:
        error = float("inf")  # a second output that is not the router's logits
    if not error <= tolerance:
        raise UnsupportedBlockError(
            f"its forward is not top-{spec.top_k} sigmoid routing scaling the inputs of the "
            f"experts in its gate_up_proj and down_proj (rel. L2 {error:.1e} on random "
            "weights); register an adapter for it (docs/adapters.md)"
        )
    return logits is not None


def _rel_l2(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.float()
    return float((ours.float() - theirs).norm() / theirs.norm().clamp_min(1e-30))
