"""``distill-dense``: replace MoE blocks by dense FFNs fitted to them on calibration data.

Each block (every MoE block, or those named) becomes a `DenseFFN` of ``width`` neurons (default:
the active width, ``top_k`` experts' worth) with the experts' kind and activation:

1. initialised from the experts (``init``): ``concat`` takes the neurons of the most used experts,
   in order of use, each expert's down projection scaled by its mean gate; ``average`` starts with
   the frequency-weighted average expert and fills any remaining width the same way;
2. a shared expert (ungated, with the experts' activation) is folded in as extra neurons; a
   gated one is kept beside the dense FFN;
3. fitted to the block's outputs on its calibration inputs (the inputs it gets once the blocks
   before it are dense): closed-form ridge least squares for the down projection, then
   ``block_steps`` Adam steps on the mean squared error to those outputs (batches of
   ``batch_tokens`` of the same fitting tokens, so they read no new text; by default as many as
   ``steps`` when the blocks train alone, none before end-to-end training);
4. then ``steps`` Adam steps on batches of ``batch_tokens`` calibration tokens (learning rate
   ``lr`` after a 5% linear warm-up, decaying on a cosine to zero): end to end when no
   MoE block is left, the model before the pass as the teacher (for a language model, KL
   divergence of the next-token distributions mixed with ``label_weight`` of cross-entropy on
   the calibration text's own next tokens, as Switch Transformer's distillation mixes soft and
   hard targets; else the mean squared error of its first output),
   training every weight of the model (``train="all"``, as Switch Transformer's distillation
   does; the artifact then stores the changed weights too) or only the dense FFNs (``"ffn"``);
   with MoE blocks left (the MoE op has no gradient), the ``block_steps`` above are all the
   training there is.

The report gives, per block, the relative error on the fitting tokens after each stage; the
training loss at the start and end; the tokens the training used and how many times over that
reads the calibration rows (``calibration_epochs``). End-to-end training that reads its
calibration text more than `MAX_EPOCHS` times over is warned about: it learns that text rather
than the teacher (docs/compression.md has the measurement).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from moec.errors import MoecError
from moec.ir import MoESpec, MoEWeights
from moec.ir.expert_kernels import expert_hidden, shared_ffn
from moec.models.dense_ffn import DenseFFN, dense_ffn_out
from moec.passes.calibration import model_inputs
from moec.passes.compression_state import (
    EXPERT_TENSORS,
    BlockStats,
    CompressionState,
    ridge_least_squares,
)
from moec.passes.pass_base import Pass, PassResult
from moec.passes.quality import first_output, is_logits
from moec.settings import DistillOptions

__all__ = ["DistillDensePass"]

RIDGE = 1e-7  # relative to the mean diagonal of the Gram matrix: for stability only
MAX_FIT_TOKENS = 65536
MAX_EPOCHS = 2.0
log = logging.getLogger(__name__)


class DistillDensePass(Pass[CompressionState]):
    name = "distill-dense"
    description = "replace MoE blocks by dense FFNs fitted to their outputs on calibration data"
    in_place = True  # it replaces blocks of the state it is given
    lossy = True

    def __init__(self, options: DistillOptions | None = None, **fields):
        """``options``, or its fields by name (checked by `DistillOptions`)."""
        self.options = dataclasses.replace(options or DistillOptions(), **fields)
        self.on_step: Callable[[int, int], None] | None = None

    def call(self, state: CompressionState) -> PassResult[CompressionState]:
        names = state.moe_blocks()
        if self.options.blocks is not None:
            unknown = sorted(set(self.options.blocks) - set(names))
            if unknown:
                raise MoecError(
                    f"--distill-blocks names {unknown}, which are not MoE blocks of this model; "
                    f"its MoE blocks: {names}"
                )
            names = [n for n in names if n in self.options.blocks]
        # The MoE op has no gradient: with MoE blocks left, each dense FFN trains on its own.
        end_to_end = self.options.steps > 0 and not set(state.moe_blocks()) - set(names)
        block_steps = self.options.block_steps
        if block_steps is None:
            block_steps = 0 if end_to_end else self.options.steps
        report = []
        for index, name in enumerate(names):
            spec, weights = state.moe(name)
            # collected again after each replacement: a block is fitted on the inputs it gets
            # from the blocks already distilled
            stats = state.stats(_fit_tokens(spec.hidden_size)).get(name)
            if stats is None:
                continue
            width = self.options.width or spec.expert_size * spec.top_k
            dense_spec, dense = initial_dense(spec, weights, stats, width, self.options.init)
            x, target = _fit_data(spec, weights, dense_spec, stats)
            errors = {"init": _rel_error(dense_spec, dense, x, target)}
            dense = _least_squares_down(dense_spec, dense, x, target)
            errors["least_squares"] = _rel_error(dense_spec, dense, x, target)
            if block_steps:
                dense = self._train_block(
                    dense_spec, dense, x, target, block_steps, index, len(names)
                )
                errors["trained"] = _rel_error(dense_spec, dense, x, target)
            state.replace(name, DenseFFN(dense_spec, dense))
            report.append(
                {
                    "block": name,
                    "width": dense_spec.expert_size,
                    "shared": _shared_note(spec, dense_spec),
                    "rel_error": errors,
                    "fit_tokens": int(x.shape[0]),
                }
            )
        summary: dict = {
            "init": self.options.init,
            "steps": self.options.steps,
            "block_steps": block_steps,
            "blocks": report,
        }
        summary["training"] = f"end to end ({self.options.train})" if end_to_end else "per block"
        if end_to_end and report:
            summary.update(self._train_end_to_end(state, [r["block"] for r in report]))
        else:  # every block trains on batches of the same calibration tokens
            tokens = min([self.options.batch_tokens] + [r["fit_tokens"] for r in report])
            summary["train_tokens"] = block_steps * tokens if report else 0
        return PassResult(state, bool(report), summary)

    def _train_block(self, spec, weights: MoEWeights, x, target, steps, index, count) -> MoEWeights:
        """Adam on one dense FFN alone: mean squared error to its block's outputs."""
        params = {
            n: getattr(weights, n).clone().requires_grad_(True)
            for n in EXPERT_TENSORS
            if getattr(weights, n) is not None
        }
        optimiser = torch.optim.Adam(params.values(), lr=self.options.lr)
        schedule = warmup_cosine(optimiser, steps)
        g = torch.Generator().manual_seed(self.options.seed + index)
        scale = target.square().mean().clamp_min(1e-12)
        batch = min(self.options.batch_tokens, x.shape[0])
        for step in range(steps):
            rows = torch.randint(0, x.shape[0], (batch,), generator=g)
            current = dataclasses.replace(weights, **params)
            loss = (dense_ffn_out(spec, current, x[rows]) - target[rows]).square().mean() / scale
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if self.on_step is not None:
                self.on_step(index * steps + step + 1, count * steps)
        return dataclasses.replace(weights, **{n: p.detach() for n, p in params.items()})

    def _train_end_to_end(self, state: CompressionState, names: list[str]) -> dict:
        """Adam on the model's weights (all, or its dense FFNs'), matching the model before the
        pass: its next-token distribution (KL) for a language model, else its first output."""
        if self.options.train == "all":
            params = [p for p in state.model.parameters() if p.is_floating_point()]
        else:
            params = [
                getattr(state.blocks[n], t)
                for n in names
                for t in EXPERT_TENSORS
                if getattr(state.blocks[n], t) is not None
            ]
        flags = {p: p.requires_grad for p in state.model.parameters()}
        for p in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimiser = torch.optim.Adam(params, lr=self.options.lr)
        schedule = warmup_cosine(optimiser, self.options.steps)
        fit = state.calibration.fit
        rows_per_step = max(1, self.options.batch_tokens // max(fit.shape[1], 1))
        epochs = self.options.steps * rows_per_step / len(fit)
        if epochs > MAX_EPOCHS:
            log.warning(
                "distillation reads its %d calibration rows %.1f times over (%d steps of %d "
                "rows): give it more calibration data (--calib, --calib-samples) or fewer steps",
                len(fit),
                epochs,
                self.options.steps,
                rows_per_step,
            )
        g = np.random.default_rng(self.options.seed)
        losses = []
        try:
            for step in range(self.options.steps):
                inputs = model_inputs(state.source, fit[g.integers(0, len(fit), rows_per_step)])
                with torch.no_grad():
                    teacher = first_output(state.reference(*inputs))
                student = first_output(state.model(*inputs))
                loss = _distillation_loss(
                    teacher, student, inputs[0], state.calibration, self.options.label_weight
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(float(loss.detach()))
                if self.on_step is not None:
                    self.on_step(step + 1, self.options.steps)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        tail = losses[-10:]
        return {
            "loss": {"first": losses[0], "last": sum(tail) / len(tail)},
            "train_tokens": self.options.steps * rows_per_step * fit.shape[1],
            "calibration_epochs": epochs,
        }


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int):
    """Linear warm-up over the first 5% of ``steps``, then cosine decay to zero."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def _distillation_loss(
    teacher, student, first_input, calibration, label_weight: float
) -> torch.Tensor:
    if calibration.is_token_ids and is_logits(teacher, first_input):
        log_t = teacher.float().log_softmax(-1)
        log_s = student.float().log_softmax(-1)
        loss = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
        if label_weight:
            # next-token cross-entropy: position i predicts token i + 1
            labels = first_input[:, 1:].reshape(-1)
            hard = F.cross_entropy(log_s[:, :-1].reshape(labels.numel(), -1), labels)
            loss = (1 - label_weight) * loss + label_weight * hard
        return loss
    return (student - teacher).square().mean() / teacher.square().mean().clamp_min(1e-12)


def _fit_tokens(hidden: int) -> int:
    """Tokens kept per block for the fit: up to 65,536, at most 256 MiB of inputs."""
    return max(4096, min(MAX_FIT_TOKENS, (1 << 26) // hidden))


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


def _rel_error(spec, weights, x, target) -> float:
    with torch.no_grad():
        diff = dense_ffn_out(spec, weights, x) - target
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
