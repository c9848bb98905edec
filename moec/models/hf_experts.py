"""Adapter for transformers' fused experts modules (``@use_experts_implementation`` classes).

Such a module holds every expert as stacked 3-D weights and is called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` by its block, after the
family's own router. moec replaces the experts module only: the router stays in the graph as
ordinary ops (``routing="external"``), so any routing the family invents is exact, and the expert
compute becomes one ``moec::moe`` node.

Recognised by structure, not by class: the decorator's flags (``has_gate``, ``is_transposed``,
``is_concatenated``, ``has_bias``) say how the weights are laid out, and the activation is
identified by probing the module's own ``_apply_gate`` (or ``act_fn``) against moec's activations
on random values, clamp ranges and softcaps included; so is a post-expert norm
(``has_post_expert_norm``, `read_post_expert_norm`). A new family with a known layout and
activation needs no new code.

A family may write its experts module without the decorator (Step-3.7): a module called as
``experts(hidden_states, top_k_index, top_k_weights)`` with stacked ``gate_up_proj`` [E, 2I, H]
and ``down_proj`` [E, H, I] is read in the decorator's default layout, and since nothing declares
that layout, the module's own forward is run on random routing and must match moec's kernel.
So must the forward of a subclass that replaces the decorated one, which moec would otherwise
drop unseen; a norm module it holds is read as a post-expert norm (Ergo's, one weight row per
expert) and must be what its forward adds.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moec.errors import UnsupportedBlockError
from moec.ir import PLAIN_ACTIVATION_FUNCTIONS, MoESpec, MoEWeights, moe_eager
from moec.models.hf_expert_norm import EPS_NAMES, read_post_expert_norm
from moec.models.layer_streaming import materialized

__all__ = ["HFExpertsAdapter", "probe_plain_activation", "top_k_of"]

TOP_K_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_k",
    "top_k",
    "num_selected_experts",
    "experts_per_token",
)
PROBE_TOKENS = 257
PROBE_RTOL = 1e-5


CALL = ["hidden_states", "top_k_index", "top_k_weights"]  # how a block calls its experts
FORWARD_PROBE_TOKENS = 16


@dataclass(frozen=True)
class Layout:
    """How an experts module stores its weights: the decorator's flags, and its defaults."""

    has_gate: bool = True
    is_transposed: bool = False
    is_concatenated: bool = True
    has_bias: bool = False
    declared: bool = True  # False: read in the default layout from an undecorated module


class HFExpertsAdapter:
    name = "hf-experts"

    def convert(self, module: nn.Module) -> tuple[MoESpec, MoEWeights] | None:
        layout = _layout(module)
        if layout is None or not isinstance(getattr(module, "down_proj", None), torch.Tensor):
            return None
        norm_eps, weights = _read_weights(module, layout)
        e, i, h = weights.w_up.shape
        activation = _probe_activation(module, i, layout)
        spec = MoESpec(
            num_experts=e,
            top_k=top_k_of(getattr(module, "config", None), default=1),
            hidden_size=h,
            expert_size=i,
            routing="external",
            expert_kind="gated" if layout.has_gate else "plain",
            post_expert_norm_eps=norm_eps,
            **activation,
        )
        if not layout.declared or _forward_overridden(module):
            _check_forward(module, spec, layout)
        return spec, weights


def _read_weights(m: nn.Module, layout: Layout) -> tuple[float | None, MoEWeights]:
    """(the post-expert norm's eps or None, the module's weights with that norm's)."""
    weights = _stacked_weights(m, layout)
    norm = _post_expert_norm(m, layout)
    return (None, weights) if norm is None else read_post_expert_norm(norm, weights)


def _post_expert_norm(m: nn.Module, layout: Layout) -> nn.Module | None:
    """The norm the module applies to each expert's output: the one the decorator's flag
    declares; for a forward of the module's own (checked by `_check_forward`), its one child
    module holding an eps (Ergo's per-expert RMS norm)."""
    if getattr(m, "has_post_expert_norm", False):
        return m.post_expert_norm
    if layout.declared and not _forward_overridden(m):
        return None
    norms = [c for c in m.children() if any(_attr_floats_of(c, EPS_NAMES))]
    return norms[0] if len(norms) == 1 else None


def _forward_overridden(m: nn.Module) -> bool:
    """True when a subclass of a decorated experts class replaces the forward the decorator
    installed (Ergo wraps it in a per-expert norm): moec would drop that work unseen."""
    return not hasattr(type(m).forward, "__wrapped__")


def _layout(m: nn.Module) -> Layout | None:
    """The module's declared layout; the default one for an undecorated experts module (called
    like one, with stacked gate_up_proj and down_proj); None for any other module."""
    if all(hasattr(m, a) for a in ("has_gate", "is_transposed", "has_bias")):
        concatenated = getattr(m, "is_concatenated", True)
        return Layout(m.has_gate, m.is_transposed, concatenated, m.has_bias)
    gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (gate_up, down)):
        return None
    if list(inspect.signature(m.forward).parameters) != CALL:
        return None
    if gate_up.shape[0] != down.shape[0]:
        raise UnsupportedBlockError(
            f"its gate_up_proj holds {gate_up.shape[0]} experts and its down_proj "
            f"{down.shape[0]}: experts without weights of their own (identity experts) "
            "are not supported yet"
        )
    e, h, i = down.shape
    if tuple(gate_up.shape) != (e, 2 * i, h):
        raise UnsupportedBlockError(
            f"its gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are "
            f"not [E, 2I, H] and [E, H, I], the only layout moec reads from an experts module "
            "without transformers' @use_experts_implementation flags; register an adapter"
        )
    return Layout(declared=False)


def _check_forward(m: nn.Module, spec: MoESpec, layout: Layout) -> None:
    """Run the module's own forward on random tokens and routing against moec's kernel on the
    weights read from it; raise if they differ (the layout was a guess)."""
    g = torch.Generator().manual_seed(0)
    dtype = m.down_proj.dtype
    x = torch.randn(FORWARD_PROBE_TOKENS, spec.hidden_size, generator=g).to(dtype)
    k = min(2, spec.num_experts)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[:k] for _ in range(len(x))])
    gates = torch.rand(len(x), k, generator=g).to(dtype)
    with torch.no_grad(), materialized(m):  # weights streamed from a checkpoint: built here
        theirs = m(x, ids, gates).float()
        ours = moe_eager(spec, _read_weights(m, layout)[1], x, ids, gates)[0].float()
    error = float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        raise UnsupportedBlockError(
            f"its forward is not the experts moec reads from its stacked weights (rel. L2 "
            f"{error:.1e} on random routing): its own forward computes something else, such as "
            "a norm per expert; register an adapter for it (docs/adapters.md)"
        )


def top_k_of(config: Any, default: int) -> int:
    """The experts-per-token count a family's config declares (names differ by family)."""
    for key in TOP_K_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _stacked_weights(m: nn.Module, layout: Layout) -> MoEWeights:
    """Canonical [E, I, H] / [E, H, I] weights from the module's layout."""

    def param(name: str) -> torch.Tensor | None:
        t = getattr(m, name, None)
        return None if t is None else t.detach()

    def as_out_in(t: torch.Tensor) -> torch.Tensor:  # [E, in, out] -> [E, out, in]
        return t.transpose(1, 2) if layout.is_transposed else t

    def split(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layout.is_concatenated:
            return t.chunk(2, dim=dim)
        index = torch.arange(t.shape[dim])
        return t.index_select(dim, index[0::2]), t.index_select(dim, index[1::2])

    down = as_out_in(param("down_proj"))
    b_down = param("down_proj_bias") if layout.has_bias else None
    if not layout.has_gate:
        up = as_out_in(param("up_proj"))
        b_up = param("up_proj_bias") if layout.has_bias else None
        return MoEWeights(router_weight=None, w_up=up, w_down=down, b_up=b_up, b_down=b_down)
    gate, up = split(as_out_in(param("gate_up_proj")), dim=1)
    b_gate = b_up = None
    if layout.has_bias:
        b_gate, b_up = split(param("gate_up_proj_bias"), dim=1)
    return MoEWeights(
        router_weight=None,
        w_gate=gate,
        w_up=up,
        w_down=down,
        b_gate=b_gate,
        b_up=b_up,
        b_down=b_down,
    )


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def _swiglu(gate, up, alpha: float, beta: float, limit: float | None):
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + beta)


def _probe_values(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gate and up values [N, size], wide enough to cross any clamp limit."""
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(PROBE_TOKENS, size, generator=g) * 6
    return gate, torch.randn(PROBE_TOKENS, size, generator=g) * 6


def _first_match(ref: torch.Tensor, candidates: dict, what: str) -> dict[str, Any]:
    for fields, value in candidates.values():
        if value.shape == ref.shape and torch.allclose(value, ref, rtol=PROBE_RTOL, atol=1e-5):
            return fields
    raise UnsupportedBlockError(
        f"{what} matches none of moec's activations ({', '.join(candidates)}); "
        "register an adapter for it (docs/adapters.md)"
    )


def probe_plain_activation(fn, size: int) -> str:
    """The name of moec's activation that ``fn`` computes (found on random values)."""
    _, up = _probe_values(size)
    with torch.no_grad():
        candidates = {
            name: ({"activation": name}, f(up)) for name, f in PLAIN_ACTIVATION_FUNCTIONS.items()
        }
        return _first_match(fn(up), candidates, f"its activation {type(fn).__name__}")["activation"]


def _probe_activation(m: nn.Module, size: int, layout: Layout) -> dict[str, Any]:
    """MoESpec activation fields reproducing the module's own gating, found by probing it."""
    if not layout.has_gate:
        return {"activation": probe_plain_activation(m.act_fn, size)}
    gate, up = _probe_values(size)
    if layout.is_concatenated:
        packed = torch.cat([gate, up], dim=-1)
    else:
        packed = torch.stack([gate, up], dim=-1).flatten(-2)
    with torch.no_grad():
        ref = m._apply_gate(packed)
        candidates = _gated_candidates(m, gate, up)
    return _first_match(ref, candidates, f"its gating {type(m).__name__}._apply_gate")


def _gated_candidates(m: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> dict:
    found = {
        name: ({"activation": name}, f(gate) * up) for name, f in PLAIN_ACTIVATION_FUNCTIONS.items()
    }
    alphas = {1.0, *(_attr_floats(m, "alpha", "swiglu_alpha", "activation_alpha"))}
    limits = {None, *(_attr_floats(m, "limit", "swiglu_limit"))}
    for limit in sorted(limits - {None}):  # clamped after the activation (Step-3.7)
        for name, f in PLAIN_ACTIVATION_FUNCTIONS.items():
            capped = f(gate).clamp(max=limit) * up.clamp(-limit, limit)
            found[f"{name}(capped at {limit})"] = (
                {"activation": name, "activation_limit": limit},
                capped,
            )
    caps = sorted(set(_softcaps(m)))
    for gate_cap in caps:  # tanh softcaps on the linear gate factor and on up (Inkling2)
        for up_cap in caps:
            fields = {
                "activation": "swiglu_softcap",
                "gate_softcap": gate_cap,
                "up_softcap": up_cap,
            }
            value = _softcap(gate, gate_cap) * torch.sigmoid(gate) * _softcap(up, up_cap)
            found[f"swiglu_softcap(gate={gate_cap}, up={up_cap})"] = (fields, value)
    for alpha in sorted(alphas):
        for beta in (0.0, 1.0):
            for limit in sorted(limits, key=lambda v: -1 if v is None else v):
                fields = {
                    "activation": "swiglu",
                    "swiglu_alpha": alpha,
                    "swiglu_beta": beta,
                    "swiglu_limit": limit,
                }
                name = f"swiglu(alpha={alpha}, beta={beta}, limit={limit})"
                found[name] = (fields, _swiglu(gate, up, alpha, beta, limit))
    return found


def _softcaps(m: nn.Module) -> list[float]:
    """Candidate softcaps: positive numbers named ``*softcap*`` on the module, its submodules
    (a softcap module holds its own) and their configs."""
    found = []
    for sub in m.modules():
        for source in (sub, getattr(sub, "config", None)):
            names = [n for n in vars(source) if "softcap" in n] if source is not None else []
            found += _attr_floats_of(source, names)
    return found


def _attr_floats(m: nn.Module, *names: str) -> list[float]:
    return [v for source in (m, getattr(m, "config", None)) for v in _attr_floats_of(source, names)]


def _attr_floats_of(source: Any, names: list[str] | tuple[str, ...]) -> list[float]:
    values = []
    for name in names:
        value = getattr(source, name, None)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and math.isfinite(value) and value > 0:  # inf: no clamp
            values.append(float(value))
    return values
