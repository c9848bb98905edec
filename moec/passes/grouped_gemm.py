"""``grouped-gemm``: the exact lowering that computes each expert on its own tokens only.

- ``ort``: whichever is faster, measured on ONNX Runtime for a block of the same shapes at a few
  token counts (geometric mean of the time relative to the fastest), of ``fused``
  (com.microsoft.MoE, where the block fits it) and ``gather`` (standard ops);
- ``onnx`` and ``trt``: ``gather`` (per expert: select its tokens, FFN, scatter-add back);
- ``torch``: whichever is faster, measured the same way in PyTorch, of moec's two kernels (tokens
  grouped by expert): ``kernel`` (one oneDNN GEMM per expert segment and projection, weights
  packed when the artifact is loaded) and ``grouped_mm`` (one ``torch._grouped_mm`` per
  projection over all segments, on the stored weights). Which wins depends on the CPU: on an
  AMD EPYC ``kernel`` took about half the time at every token count, on a Xeon with AMX
  ``grouped_mm`` was faster for 64 small experts at a few tokens.

Blocks whose experts are modules keep their gather -> subgraph -> scatter path. Measurements are
made once per distinct block configuration and kept in the report. Runs after capture.
"""

from __future__ import annotations

from moec.compiler.capture import CapturedProgram, moe_nodes
from moec.compiler.lowering_support import EXACT_DEFAULT, unsupported_reasons
from moec.compiler.lowering_timer import TIMED_TOKENS, time_lowerings
from moec.ir import WEIGHT_NAMES, MoESpec
from moec.passes.pass_base import Pass, PassResult

__all__ = ["GroupedGemmPass"]

# per target, the exact lowerings timed against each other
MEASURED_CANDIDATES = {"ort": ("fused", "gather"), "torch": ("kernel", "grouped_mm")}
RUNTIME_NAMES = {"ort": "ORT", "torch": "PyTorch"}


class GroupedGemmPass(Pass):
    name = "grouped-gemm"
    description = (
        "each expert on its own tokens: ort the faster of fused/gather, torch of kernel/"
        "grouped_mm (measured), onnx gather"
    )

    def __init__(self, target: str):
        self.target = target

    def call(self, program: CapturedProgram) -> PassResult:
        timings: dict[str, dict[str, float]] = {}
        choices = []
        for node in moe_nodes(program.program):
            block = program.block_for(node)
            spec = MoESpec.from_json(node.args[-1]).with_lowering(None)
            present = {
                n for n, a in zip(WEIGHT_NAMES, node.args[3:-1], strict=True) if a is not None
            }
            lowering, reason = self._choose(spec, present, timings)
            node.args = (*node.args[:-1], spec.with_lowering(lowering).to_json())
            block.lowering, block.reason = lowering, reason
            choices.append({"block": block.name, "lowering": lowering, "reason": reason})
        report = {"blocks": choices, "timed_tokens": list(TIMED_TOKENS), "relative_time": timings}
        return PassResult(program, bool(choices), report)

    def _choose(self, spec: MoESpec, present: set[str], timings: dict) -> tuple[str, str]:
        fallback = EXACT_DEFAULT[self.target]
        if self.target not in MEASURED_CANDIDATES:
            return fallback, f"the exact grouped lowering for target {self.target}"
        fits, rejected = [], []
        for lowering in MEASURED_CANDIDATES[self.target]:
            reasons = unsupported_reasons(spec, lowering)
            if reasons:
                rejected.append(f"not {lowering}: " + "; ".join(reasons))
            else:
                fits.append(lowering)
        if len(fits) <= 1:
            return (fits or [fallback])[0], "; ".join(rejected)
        key = f"{spec.summary()} (hidden {spec.hidden_size})"
        if key not in timings:
            timings[key] = time_lowerings(spec, present, fits, self.target)
        relative = timings[key]
        best = min(relative, key=relative.get)
        spread = ", ".join(f"{k} {v:.2f}" for k, v in relative.items())
        runtime = RUNTIME_NAMES[self.target]
        return (
            best,
            f"faster on {runtime} (time relative to the best, over T={list(TIMED_TOKENS)}: "
            f"{spread})",
        )
