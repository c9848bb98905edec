"""``grouped-gemm``: give every MoE block the exact lowering that computes each expert on its
own tokens, by the target's default rule, or with ``autotune`` by timing on this host.

The default rule (`moec.registry.Target.default`) is deterministic: the first of the target's
preferred lowerings that can compute the block and whose size bound the block is within, the
bounds being the crossover points `bench/lowering_crossover.py` measured. With ``autotune`` the
target's candidates (``Target.autotune``) that can compute the block are timed on this host
(`moec.compiler.autotune`, cached on disk) and the fastest kept. Blocks whose experts are
modules keep their gather -> subgraph -> scatter path. Runs after capture.
"""

from __future__ import annotations

from moec import registry
from moec.compiler.autotune import TIMED_TOKENS, autotune
from moec.errors import LoweringError
from moec.ir.moe_spec import MoESpec
from moec.ir.program import CapturedProgram
from moec.passes.pass_base import Pass, PassResult
from moec.registry import Target
from moec.timing import relative_times

__all__ = ["GroupedGemmPass", "default_lowering"]


def default_lowering(target: Target, spec: MoESpec) -> tuple[str, str]:
    """(lowering, why) for ``spec`` by ``target``'s default rule; `LoweringError` when no step
    of the rule can compute the block."""
    skipped = []
    for step in target.default:
        if not step.concerns(spec):
            continue
        reasons = registry.lowering(step.lowering).unsupported_reasons(spec)
        if reasons:
            skipped.append(f"not {step.lowering}: {'; '.join(reasons)}")
        elif not step.applies(spec):
            size = spec.hidden_size * spec.expert_size
            bound = step.max_expert_elements
            skipped.append(
                f"not {step.lowering}: hidden x expert size {size} > {bound}, above which it "
                "measured slower"
            )
        else:
            why = step.why or f"the default lowering of target {target.name}"
            return step.lowering, "; ".join([*skipped, why])
    raise LoweringError(f"target {target.name} has no lowering for it: {'; '.join(skipped)}")


class GroupedGemmPass(Pass[CapturedProgram]):
    name = "grouped-gemm"
    description = "each expert on its own tokens: the target's default rule, or --autotune"
    in_place = True  # it sets each block's lowering in the program it is given

    def __init__(self, target: str, autotune: bool = False):
        self.target = registry.target(target)
        self.autotune = autotune

    def call(self, program: CapturedProgram) -> PassResult[CapturedProgram]:
        timings: dict[str, dict] = {}
        choices = []
        for node in program.moe_nodes():
            block = program.block_for(node)
            spec = program.spec(node).with_lowering(None)
            try:
                if self.autotune:
                    lowering, reason = self._timed(spec, program.present_weights(node), timings)
                else:
                    lowering, reason = default_lowering(self.target, spec)
            except LoweringError as e:
                where = f"{block.name or '(model)'} ({block.class_name})"
                raise LoweringError(f"MoE block {where}: {e}") from e
            reason = registry.lowering(lowering).with_note(spec, reason)
            program.set_lowering(node, lowering, reason)
            choices.append({"block": block.name, "lowering": lowering, "reason": reason})
        report: dict = {"blocks": choices, "autotune": self.autotune}
        if self.autotune:
            report.update(timed_tokens=list(TIMED_TOKENS), timings=timings)
        return PassResult(program, bool(choices), report)

    def _timed(self, spec: MoESpec, present: set[str], timings: dict) -> tuple[str, str]:
        fits, rejected = [], []
        for name in self.target.autotune:
            reasons = registry.lowering(name).unsupported_reasons(spec)
            if reasons:
                rejected.append(f"not {name}: " + "; ".join(reasons))
            else:
                fits.append(name)
        if not fits:
            lowering, why = default_lowering(self.target, spec)
            return lowering, "; ".join([*rejected, f"nothing to time: {why}"])
        if len(fits) == 1:
            return fits[0], "; ".join([*rejected, f"{fits[0]}: the one candidate, not timed"])
        key = f"{spec.summary()} (hidden {spec.hidden_size})"
        seconds, cached = autotune(spec, present, fits, self.target)
        relative = relative_times(seconds)
        timings[key] = {"relative_time": relative, "cached": cached}
        best = min(relative, key=relative.get)
        spread = ", ".join(f"{k} {v:.2f}" for k, v in relative.items())
        source = "cached timing" if cached else "timed"
        return best, (
            f"fastest on this host ({source}; time relative to the best over "
            f"T={list(TIMED_TOKENS)}: {spread})"
        )
