"""``capacity``: the static-shape lowering, [E, C, H] expert buffers and batched MatMuls.

``C = min(T, ceil(F * T * k / E))`` slots per expert for a call of T tokens. F is given
(``--capacity-factor F``) or, with ``--capacity auto``, the largest per-expert load seen on the
calibration data relative to an even spread (``load * E / (T * k)``), times ``margin``. Exact
when no expert is over capacity; otherwise the pairs past C are dropped in token order, and the
report gives the drop rate measured on the calibration data: dropped (token, expert) pairs over
routed pairs, with C computed per calibration call exactly as the lowering computes it.
Run instead of ``grouped-gemm``; blocks it cannot lower (expert-choice routing, module experts)
keep their exact lowering and the report says why.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moec import registry
from moec.errors import SettingsError
from moec.ir.moe_spec import MoESpec
from moec.ir.program import CapturedProgram
from moec.passes.pass_base import Pass, PassResult

__all__ = ["CALIBRATION_SCHEDULE", "CapacityPass", "drop_rate"]

CALIBRATION_SCHEDULE = ((1, 16), (2, 64), (4, 128))
AUTO_MARGIN = 1.1


def drop_rate(loads: list[np.ndarray], capacity) -> tuple[int, int]:
    """(dropped, routed) pairs for per-call expert loads [E] and ``capacity(tokens_in_call)``."""
    dropped = routed = 0
    for load, tokens in loads:
        c = capacity(tokens)
        dropped += int(np.maximum(load - c, 0).sum())
        routed += int(load.sum())
    return dropped, routed


class CapacityPass(Pass[CapturedProgram]):
    name = "capacity"
    description = "static [E, C, H] expert buffers; drops past capacity, reports the drop rate"
    in_place = True  # it sets each block's lowering in the program it is given

    def __init__(
        self,
        target: str,
        factor: float | str,
        calibration: list[dict[str, np.ndarray]],
        margin: float = AUTO_MARGIN,
    ):
        """``factor``: F, or ``"auto"`` (checked by `CompileSettings`)."""
        if not calibration:
            raise SettingsError("the capacity pass needs calibration inputs")
        self.target = registry.target(target)
        self.lowering = registry.lowering(registry.CAPACITY)
        self.factor, self.calibration, self.margin = factor, calibration, margin

    def call(self, program: CapturedProgram) -> PassResult[CapturedProgram]:
        loads = self._loads(program)
        choices = []
        for node in program.moe_nodes():
            block = program.block_for(node)
            spec = program.spec(node).with_lowering(None)
            reasons = self.lowering.unsupported_reasons(spec)
            if reasons:
                reason = "no capacity: " + "; ".join(reasons)
                program.set_lowering(node, self.target.fallback, reason)
                choices.append(
                    {"block": block.name, "lowering": self.target.fallback, "reason": reason}
                )
                continue
            block_loads = loads[block.name]
            factor = self._factor(spec, block_loads)
            dropped, routed = drop_rate(
                block_loads, spec.with_lowering(self.lowering.name, factor).lowering_capacity
            )
            rate = dropped / routed if routed else 0.0
            reason = f"capacity factor {factor:.3g}; drop rate {rate:.2%} on calibration"
            program.set_lowering(node, self.lowering.name, reason, factor)
            choices.append(
                {
                    "block": block.name,
                    "lowering": self.lowering.name,
                    "capacity_factor": factor,
                    "dropped_pairs": dropped,
                    "routed_pairs": routed,
                    "drop_rate": rate,
                }
            )
        total_dropped = sum(c.get("dropped_pairs", 0) for c in choices)
        total_routed = sum(c.get("routed_pairs", 0) for c in choices)
        report = {
            "blocks": choices,
            "calibration_calls": len(self.calibration),
            "drop_rate": total_dropped / total_routed if total_routed else 0.0,
        }
        return PassResult(program, bool(choices), report)

    def _factor(self, spec: MoESpec, loads: list[tuple[np.ndarray, int]]) -> float:
        if self.factor != "auto":
            return float(self.factor)
        k = spec.top_k
        peak = max(float(load.max()) * spec.num_experts / (tokens * k) for load, tokens in loads)
        # a multiple of 1/1024: the slots are then computed exactly in integers (`ceil_scaled`)
        return math.ceil(peak * self.margin * 1024) / 1024

    def _loads(self, program: CapturedProgram) -> dict[str, list[tuple[np.ndarray, int]]]:
        """Per block, per calibration call: (tokens routed to each expert [E], tokens in call)."""
        module = program.program.module()
        routing = [(i, o) for i, o in enumerate(program.outputs) if o.role == "routing"]
        loads: dict[str, list] = {o.block: [] for _, o in routing}
        for feeds in self.calibration:
            args = [torch.from_numpy(feeds[spec.name]) for spec in program.inputs]
            with torch.no_grad():
                outputs = module(*args)
            for i, spec in routing:
                chosen = outputs[i].reshape(-1, outputs[i].shape[-1])
                loads[spec.block].append((chosen.sum(0).numpy(), chosen.shape[0]))
        return loads
