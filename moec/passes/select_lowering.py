"""``select-lowering``: give every MoE block the lowering the user asked for (``--lowering``).

Refuses a block the lowering cannot compute (the error names the block and why); the settings
have already refused a lowering the target cannot run. Replaces the default ``grouped-gemm``
pass; runs after capture.
"""

from __future__ import annotations

from moec import registry
from moec.errors import LoweringError
from moec.ir.program import CapturedProgram
from moec.passes.pass_base import Pass, PassResult

__all__ = ["SelectLoweringPass"]


class SelectLoweringPass(Pass[CapturedProgram]):
    name = "select-lowering"
    description = "give every MoE block the lowering asked for with --lowering"
    in_place = True  # it sets each block's lowering in the program it is given

    def __init__(self, lowering: str):
        self.lowering = registry.lowering(lowering)

    def call(self, program: CapturedProgram) -> PassResult[CapturedProgram]:
        choices = []
        for node in program.moe_nodes():
            block = program.block_for(node)
            reasons = self.lowering.unsupported_reasons(program.spec(node))
            if reasons:
                where = f"{block.name or '(model)'} ({block.class_name})"
                raise LoweringError(
                    f"--lowering {self.lowering.name} cannot compute MoE block {where}: "
                    f"{'; '.join(reasons)}"
                )
            reason = self.lowering.with_note(program.spec(node), "asked for with --lowering")
            program.set_lowering(node, self.lowering.name, reason)
            choices.append({"block": block.name, "lowering": self.lowering.name})
        return PassResult(program, bool(choices), {"blocks": choices})
