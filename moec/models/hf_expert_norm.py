"""Read an experts module's post-expert norm (``has_post_expert_norm``) into moec's form.

moec's post-expert norm is ``rms(y) * weight[e]`` on each expert's output y (`MoESpec`). A
family's norm module is recognised by structure: a copy of it with a random weight is probed on
random rows against the RMS norms it may be (normalise, then scale by ``weight`` or
``1 + weight``; or scale, then normalise, as MuseSpark does). A norm with one weight row per
expert is called as ``norm(y, expert_ids)`` (Ergo, weight [E, H]) and probed on random ids.
The form found is then applied to the real weight with tensor ops, which also works on weights
still on disk (recorded, not run); a scale before normalising is folded into the rows of the
down projection (an exact per-channel scale of each expert's output).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
from torch import nn

from moec.errors import UnsupportedBlockError
from moec.ir import MoEWeights

__all__ = ["read_post_expert_norm"]

EPS_NAMES = ("eps", "variance_epsilon", "epsilon")
PROBE_ROWS = 64
# name -> (the scale from the norm's weight, or None; whether it applies before normalising)
FORMS = {
    "rms(y)": (None, False),
    "rms(y) * weight": (lambda w: w, False),
    "rms(y) * (1 + weight)": (lambda w: 1 + w, False),
    "rms(y * weight)": (lambda w: w, True),
    "rms(y * (1 + weight))": (lambda w: 1 + w, True),
}


def read_post_expert_norm(norm: nn.Module, weights: MoEWeights) -> tuple[float, MoEWeights]:
    """(eps, ``weights`` with the norm's scale as post_norm_weight [E, H] or folded into
    w_down and b_down) for ``norm``, a module called as ``norm(y [n, H])``, or as
    ``norm(y [n, H], expert_ids [n])`` when its weight is [E, H]."""
    e, h, _ = weights.w_down.shape
    eps = next((getattr(norm, n) for n in EPS_NAMES if _is_float(getattr(norm, n, None))), None)
    inputs = len(inspect.signature(norm.forward).parameters)
    if eps is None or inputs not in (1, 2):
        raise UnsupportedBlockError(
            f"its post-expert norm {type(norm).__name__} is not an RMS norm called as norm(y) "
            "or norm(y, expert_ids) with an eps moec can read; register an adapter for it "
            "(docs/adapters.md)"
        )
    weight = getattr(norm, "weight", None)
    shape = (e, h) if inputs == 2 else (h,)
    has_weight = isinstance(weight, torch.Tensor) and tuple(weight.shape) == shape
    scale_of, before = _probe_form(norm, float(eps), shape, has_weight)
    if scale_of is None:
        return float(eps), weights
    scale = scale_of(weight.detach().float()).to(weights.w_down.dtype).expand(e, h)
    if not before:
        return float(eps), dataclasses.replace(weights, post_norm_weight=scale)
    b_down = None if weights.b_down is None else weights.b_down * scale
    return float(eps), dataclasses.replace(
        weights, w_down=weights.w_down * scale[:, :, None], b_down=b_down
    )


def _probe_form(norm: nn.Module, eps: float, shape: tuple[int, ...], has_weight: bool):
    """The entry of `FORMS` that a copy of ``norm`` with a random weight of ``shape`` ([H], or
    [E, H] for a norm also called with the expert ids) computes."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(PROBE_ROWS, shape[-1], generator=g) * 3
    ids = torch.randint(shape[0], (PROBE_ROWS,), generator=g)  # used only with [E, H]
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()  # its weight may be on disk
    forms = dict(FORMS)
    if has_weight:
        random_weight = torch.rand(shape, generator=g) + 0.5
        probe.weight = nn.Parameter(random_weight, requires_grad=False)
    else:
        forms = {"rms(y)": FORMS["rms(y)"]}
    with torch.no_grad():
        theirs = probe(y, ids) if len(shape) == 2 else probe(y)
    for scale_of, before in forms.values():
        s = 1.0 if scale_of is None else scale_of(random_weight)
        s = s[ids] if len(shape) == 2 and scale_of is not None else s
        ours = _rms(y * s, eps) if before else _rms(y, eps) * s
        if torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
            return scale_of, before
    raise UnsupportedBlockError(
        f"its post-expert norm {type(norm).__name__} matches none of the RMS norms moec knows "
        f"({', '.join(forms)}); register an adapter for it (docs/adapters.md)"
    )


def _rms(y: torch.Tensor, eps: float) -> torch.Tensor:
    return y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)


def _is_float(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
