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

from moec.compiler.capture import CapturedProgram, moe_nodes
from moec.compiler.lowering_support import EXACT_DEFAULT, unsupported_reasons
from moec.errors import MoecError
from moec.ir import MoESpec
from moec.passes.pass_base import Pass, PassResult
from moec.passes.select_lowering import check_lowering

__all__ = ["CALIBRATION_SCHEDULE", "CapacityPass", "check_capacity", "drop_rate"]

CALIBRATION_SCHEDULE = ((1, 16), (2, 64), (4, 128))
AUTO_MARGIN = 1.1


def check_capacity(factor: object) -> None:
    """Raise unless ``factor`` is a number > 0 or ``"auto"``."""
    number = isinstance(factor, (int, float)) and not isinstance(factor, bool)
    if factor != "auto" and not (number and factor > 0):
        raise MoecError(
            f"--capacity-factor must be a number > 0 (or use --capacity auto), not {factor!r}"
        )


def drop_rate(loads: list[np.ndarray], capacity) -> tuple[int, int]:
    """(dropped, routed) pairs for per-call expert loads [E] and ``capacity(tokens_in_call)``."""
    dropped = routed = 0
    for load, tokens in loads:
        c = capacity(tokens)
        dropped += int(np.maximum(load - c, 0).sum())
        routed += int(load.sum())
    return dropped, routed


class CapacityPass(Pass):
    name = "capacity"
    description = "static [E, C, H] expert buffers; drops past capacity, reports the drop rate"

    def __init__(
        self,
        target: str,
        factor: float | str,
        calibration: list[dict[str, np.ndarray]],
        margin: float = AUTO_MARGIN,
    ):
        check_lowering(target, "capacity")
        check_capacity(factor)
        if not calibration:
            raise MoecError("the capacity pass needs calibration inputs")
        self.target, self.factor, self.calibration, self.margin = (
            target,
            factor,
            calibration,
            margin,
        )

    def call(self, program: CapturedProgram) -> PassResult:
        loads = self._loads(program)
        choices = []
        for node in moe_nodes(program.program):
            block = program.block_for(node)
            spec = MoESpec.from_json(node.args[-1]).with_lowering(None)
            reasons = unsupported_reasons(spec, "capacity")
            if reasons:
                lowering = EXACT_DEFAULT[self.target]
                node.args = (*node.args[:-1], spec.with_lowering(lowering).to_json())
                block.lowering, block.reason = lowering, "no capacity: " + "; ".join(reasons)
                choices.append({"block": block.name, "lowering": lowering, "reason": block.reason})
                continue
            block_loads = loads[block.name]
            factor = self._factor(spec, block_loads)
            spec = spec.with_lowering("capacity", factor)
            dropped, routed = drop_rate(block_loads, spec.lowering_capacity)
            node.args = (*node.args[:-1], spec.to_json())
            rate = dropped / routed if routed else 0.0
            block.lowering = "capacity"
            block.reason = f"capacity factor {factor:.3g}; drop rate {rate:.2%} on calibration"
            choices.append(
                {
                    "block": block.name,
                    "lowering": "capacity",
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
        return math.ceil(peak * self.margin * 1000) / 1000

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
