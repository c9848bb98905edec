"""``distill-dense``: replace MoE blocks by dense FFNs fitted to them on calibration data.

Each block (every MoE block, or those named) becomes a `DenseFFN` of ``width`` neurons (default:
the active width, ``top_k`` experts' worth) with the experts' kind and activation:

1. initialised from the experts (``init``): ``concat`` takes the neurons of the most used experts,
   in order of use, each expert's down projection scaled by its mean gate; ``average`` starts with
   the frequency-weighted average expert and fills any remaining width the same way;
2. a shared expert (ungated, with the experts' activation) is folded in as extra neurons; a
   gated one is kept beside the dense FFN;
3. fitted to the block's outputs on its calibration inputs: closed-form ridge least squares for
   the down projection, then ``steps`` Adam steps on all of the FFN's weights (mean squared
   error on batches of ``batch_tokens`` tokens).

The report gives, per block, the relative error on the fitting tokens after each stage and the
tokens the fit used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from moec.errors import MoecError
from moec.ir import MoESpec, MoEWeights
from moec.ir.moe_op import expert_hidden, shared_ffn
from moec.models.dense_ffn import DenseFFN
from moec.passes.compression_state import (
    EXPERT_TENSORS,
    BlockStats,
    CompressionState,
    ridge_least_squares,
)
from moec.passes.pass_base import Pass, PassResult

__all__ = ["DISTILL_INITS", "DistillDensePass"]

DISTILL_INITS = ("concat", "average")
RIDGE = 1e-7  # relative to the mean diagonal of the Gram matrix: for stability only
FIT_TOKENS = 65536


class DistillDensePass(Pass):
    name = "distill-dense"
    description = "replace MoE blocks by dense FFNs fitted to their outputs on calibration data"
    lossy = True

    def __init__(
        self,
        width: int | None = None,
        steps: int = 0,
        blocks: list[str] | None = None,
        init: str = "concat",
        lr: float = 1e-3,
        batch_tokens: int = 1024,
        seed: int = 0,
    ):
        if width is not None and width <= 0:
            raise MoecError(f"--dense-width must be > 0, not {width}")
        if steps < 0:
            raise MoecError(f"--distill-steps must be >= 0, not {steps}")
        if init not in DISTILL_INITS:
            raise MoecError(f"distillation init {init!r}: choose one of {DISTILL_INITS}")
        self.width, self.steps, self.blocks, self.init = width, steps, blocks, init
        self.lr, self.batch_tokens, self.seed = lr, batch_tokens, seed
        self.on_step: Callable[[int, int], None] | None = None

    def call(self, state: CompressionState) -> PassResult:
        names = state.moe_blocks()
        if self.blocks is not None:
            unknown = sorted(set(self.blocks) - set(names))
            if unknown:
                raise MoecError(
                    f"--distill-blocks names {unknown}, which are not MoE blocks of this model; "
                    f"its MoE blocks: {names}"
                )
            names = [n for n in names if n in self.blocks]
        stats = state.stats(FIT_TOKENS)
        report = []
        for index, name in enumerate(names):
            if name not in stats:
                continue
            spec, weights = state.moe(name)
            width = self.width or spec.expert_size * spec.top_k
            dense_spec, dense = initial_dense(spec, weights, stats[name], width, self.init)
            x, target = _fit_data(spec, weights, dense_spec, stats[name])
            errors = {"init": _rel_error(dense_spec, dense, x, target)}
            dense = _least_squares_down(dense_spec, dense, x, target)
            errors["least_squares"] = _rel_error(dense_spec, dense, x, target)
            if self.steps:
                dense = self._train(dense_spec, dense, x, target, index, len(names))
                errors["trained"] = _rel_error(dense_spec, dense, x, target)
            state.replace(name, DenseFFN(dense_spec, dense))
            report.append(
                {
                    "block": name,
                    "width": dense_spec.expert_size,
                    "shared": _shared_note(spec, dense_spec),
                    "rel_error": errors,
                    "fit_tokens": int(x.shape[0]),
                    "train_tokens": self.steps * min(self.batch_tokens, int(x.shape[0])),
                }
            )
        summary = {"init": self.init, "steps": self.steps, "blocks": report}
        summary["train_tokens"] = sum(b["train_tokens"] for b in report)
        return PassResult(state, bool(report), summary)

    def _train(self, spec, weights: MoEWeights, x, target, index: int, count: int) -> MoEWeights:
        params = {
            n: getattr(weights, n).clone().requires_grad_(True)
            for n in EXPERT_TENSORS
            if getattr(weights, n) is not None
        }
        optimiser = torch.optim.Adam(params.values(), lr=self.lr)
        g = torch.Generator().manual_seed(self.seed + index)
        scale = target.square().mean().clamp_min(1e-12)
        batch = min(self.batch_tokens, x.shape[0])
        for step in range(self.steps):
            rows = torch.randint(0, x.shape[0], (batch,), generator=g)
            current = dataclasses.replace(weights, **params)
            loss = (_dense_out(spec, current, x[rows]) - target[rows]).square().mean() / scale
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if self.on_step is not None:
                self.on_step(index * self.steps + step + 1, count * self.steps)
        return dataclasses.replace(weights, **{n: p.detach() for n, p in params.items()})


def initial_dense(
    spec: MoESpec, weights: MoEWeights, stats: BlockStats, width: int, init: str
) -> tuple[MoESpec, MoEWeights]:
    """The dense FFN before fitting (see module docstring); shared expert folded or kept."""
    freq = stats.frequency.double()
    mass = stats.gate_mass.double()
    order = np.argsort(-freq.numpy(), kind="stable").tolist()
    gated = spec.expert_kind == "gated"
    parts: dict[str, list[torch.Tensor]] = {"w_gate": [], "w_up": [], "w_down": []}
    has = {n: getattr(weights, n) is not None for n in ("b_gate", "b_up")}
    parts.update({n: [] for n, present in has.items() if present})

    def take(expert_rows: dict[str, torch.Tensor], down: torch.Tensor, count: int) -> None:
        for n, rows in expert_rows.items():
            parts[n].append(rows[:count])
        parts["w_down"].append(down[:, :count])

    filled = 0
    if init == "average":
        mix = (freq / freq.sum().clamp_min(1e-12)).to(weights.w_up.dtype)
        count = min(width, spec.expert_size)
        rows = {
            n: torch.einsum("e,e...->...", mix, getattr(weights, n))
            for n in _row_tensors(spec, has)
        }
        down = torch.einsum("e,ehi->hi", mix, weights.w_down) * float(mass.sum())
        take(rows, down, count)
        filled = count
    for e in order:
        if filled >= width:
            break
        count = min(width - filled, spec.expert_size)
        rows = {n: getattr(weights, n)[e] for n in _row_tensors(spec, has)}
        take(rows, weights.w_down[e] * float(mass[e]), count)
        filled += count
    while filled < width:  # wider than all experts together: repeat the most used, silenced
        count = min(width - filled, spec.expert_size)
        rows = {n: getattr(weights, n)[order[0]] for n in _row_tensors(spec, has)}
        take(rows, torch.zeros_like(weights.w_down[0]), count)
        filled += count
    fold = _can_fold_shared(spec)
    if fold:
        parts["w_gate"].append(weights.shared_gate)
        parts["w_up"].append(weights.shared_up)
        parts["w_down"].append(weights.shared_down)
        for n in (n for n, present in has.items() if present):  # the shared expert has none
            parts[n].append(torch.zeros(spec.shared_expert_size, dtype=weights.w_up.dtype))
    dense = {
        n: torch.cat(v, dim=-1 if n == "w_down" else 0).unsqueeze(0) for n, v in parts.items() if v
    }
    if weights.b_down is not None:
        dense["b_down"] = (mass.to(weights.b_down.dtype) @ weights.b_down).unsqueeze(0)
    total = width + (spec.shared_expert_size if fold else 0)
    kept_shared = (
        {}
        if fold
        else {
            n: getattr(weights, n)
            for n in ("shared_gate", "shared_up", "shared_down", "shared_expert_gate")
        }
    )
    dense_spec = dataclasses.replace(
        spec,
        num_experts=1,
        top_k=1,
        routing="external",
        expert_size=total,
        expert_map=None,
        n_group=1,
        topk_group=1,
        expert_capacity=None,
        capacity_factor=None,
        shared_expert_size=0 if fold else spec.shared_expert_size,
        shared_expert_gated=False if fold else spec.shared_expert_gated,
        lowering=None,
        lowering_capacity_factor=None,
    )
    if not gated:
        dense.pop("w_gate", None)
    weights = MoEWeights(
        router_weight=None, **dense, **kept_shared, output_bias=weights.output_bias
    )
    return dense_spec, weights


def _row_tensors(spec: MoESpec, has: dict[str, bool]) -> list[str]:
    names = ["w_up"] + (["w_gate"] if spec.expert_kind == "gated" else [])
    return names + [n for n, present in has.items() if present]


def _can_fold_shared(spec: MoESpec) -> bool:
    """A shared expert joins the dense FFN as neurons when it is the same kind of FFN."""
    return (
        spec.shared_expert_size > 0
        and not spec.shared_expert_gated
        and spec.expert_kind == "gated"
        and spec.activation == spec.shared_activation
    )


def _shared_note(spec: MoESpec, dense_spec: MoESpec) -> str:
    if not spec.shared_expert_size:
        return "none"
    return "kept beside" if dense_spec.shared_expert_size else "folded in"


def _fit_data(spec, weights, dense_spec, stats: BlockStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [N, H], the part of the block's output the dense FFN itself must produce [N, H])."""
    target = stats.y.clone()
    if weights.output_bias is not None:
        target = target - weights.output_bias
    if dense_spec.shared_expert_size:  # kept beside: not the FFN's to produce
        with torch.no_grad():
            target = target - shared_ffn(spec, weights, stats.x)
    return stats.x, target


def _dense_out(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> torch.Tensor:
    hidden = expert_hidden(spec, weights, 0, x)
    out = hidden @ weights.w_down[0].T
    return out if weights.b_down is None else out + weights.b_down[0]


def _rel_error(spec, weights, x, target) -> float:
    with torch.no_grad():
        diff = _dense_out(spec, weights, x) - target
    return float(diff.norm() / target.norm().clamp_min(1e-12))


def _least_squares_down(spec, weights: MoEWeights, x, target) -> MoEWeights:
    with torch.no_grad():
        hidden = expert_hidden(spec, weights, 0, x)
    bias = weights.b_down is not None
    if bias:
        hidden = torch.cat([hidden, torch.ones(len(hidden), 1, dtype=hidden.dtype)], dim=1)
    solution = ridge_least_squares(hidden, target, RIDGE).T  # [H, I (+1)]
    dtype = weights.w_down.dtype
    if bias:
        return dataclasses.replace(
            weights,
            w_down=solution[:, :-1].unsqueeze(0).to(dtype),
            b_down=solution[:, -1].unsqueeze(0).to(dtype),
        )
    return dataclasses.replace(weights, w_down=solution.unsqueeze(0).to(dtype))
