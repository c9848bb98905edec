"""``select-lowering``: give every MoE block the lowering the user asked for (``--lowering``).

Refuses a lowering the target cannot run (the error lists those it can) and a block the lowering
cannot compute (the error names the block and why). Replaces the default ``grouped-gemm`` pass;
lowering reads the choice from each node's spec.
"""

from __future__ import annotations

from moec.compiler.capture import CapturedProgram, moe_nodes
from moec.compiler.lowering_support import TARGET_LOWERINGS, unsupported_reasons
from moec.errors import LoweringError
from moec.ir import MoESpec
from moec.passes.pass_base import Pass, PassResult

__all__ = ["SelectLoweringPass", "check_lowering"]


def check_lowering(target: str, lowering: str) -> None:
    """Raise unless ``target`` can run ``lowering``."""
    allowed = TARGET_LOWERINGS.get(target, ())
    if lowering not in allowed:
        raise LoweringError(
            f"--lowering {lowering} cannot run on target {target}; it can run: {', '.join(allowed)}"
        )


class SelectLoweringPass(Pass):
    name = "select-lowering"
    description = "give every MoE block the lowering asked for with --lowering"

    def __init__(self, target: str, lowering: str):
        check_lowering(target, lowering)
        self.target, self.lowering = target, lowering

    def call(self, program: CapturedProgram) -> PassResult:
        choices = []
        for node in moe_nodes(program.program):
            block = program.block_for(node)
            spec = MoESpec.from_json(node.args[-1])
            reasons = unsupported_reasons(spec, self.lowering)
            if reasons:
                where = f"{block.name or '(model)'} ({block.class_name})"
                raise LoweringError(
                    f"--lowering {self.lowering} cannot compute MoE block {where}: "
                    f"{'; '.join(reasons)}"
                )
            node.args = (*node.args[:-1], spec.with_lowering(self.lowering).to_json())
            block.lowering, block.reason = self.lowering, "asked for with --lowering"
            choices.append({"block": block.name, "lowering": self.lowering})
        return PassResult(program, bool(choices), {"blocks": choices})
