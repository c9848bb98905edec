"""``select-lowering``: choose how each ``moec::moe`` node is lowered for the target.

For ``ort``: ``fused`` (ONNX Runtime's com.microsoft.MoE) wherever the block fits it, else
``dense``; for ``onnx``: ``dense`` (standard ops only). The reason a block did not get the
fused lowering is kept in the report and in the artifact's manifest. Runs after capture and
after any pass that changes blocks; lowering reads the choice from each node's spec.
"""

from __future__ import annotations

from moec.compiler.capture import CapturedProgram, moe_nodes
from moec.compiler.lower_moe_fused import fused_unsupported_reasons
from moec.ir import MoESpec
from moec.passes.pass_base import Pass, PassResult

__all__ = ["SelectLoweringPass"]

TARGET_LOWERINGS = {"ort": ("fused", "dense"), "onnx": ("dense",)}


class SelectLoweringPass(Pass):
    name = "select-lowering"
    description = "pick each MoE block's lowering for the target (fused where it fits, else dense)"

    def __init__(self, target: str):
        self.target = target

    def call(self, program: CapturedProgram) -> PassResult:
        choices = []
        modified = False
        for node in moe_nodes(program.program):
            block = program.block_for(node)
            spec = MoESpec.from_json(node.args[-1])
            lowering, reason = self._choose(spec)
            if spec.lowering != lowering:
                node.args = (*node.args[:-1], spec.with_lowering(lowering).to_json())
                modified = True
            block.lowering, block.reason = lowering, reason
            choices.append({"block": block.name, "lowering": lowering, "reason": reason})
        return PassResult(program, modified, {"blocks": choices})

    def _choose(self, spec: MoESpec) -> tuple[str, str]:
        if "fused" not in TARGET_LOWERINGS[self.target]:
            return "dense", f"target {self.target} uses standard ONNX ops only"
        reasons = fused_unsupported_reasons(spec)
        if reasons:
            return "dense", "; ".join(reasons)
        return "fused", "fits com.microsoft.MoE"
