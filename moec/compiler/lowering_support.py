"""Which lowerings each target can run, and why a block cannot take a lowering.

Rules as data (after Torch-TensorRT's converter capability checks): a lowering a block cannot
take comes back with its reasons, so "not supported" is an answer, not a silent fallback.
"""

from __future__ import annotations

from moec.compiler.lower_moe_fused import fused_unsupported_reasons
from moec.ir import MoESpec
from moec.ir.moe_op import GROUPED_MM_ALIGN

__all__ = ["EXACT_DEFAULT", "TARGET_LOWERINGS", "unsupported_reasons"]

TARGET_LOWERINGS: dict[str, tuple[str, ...]] = {
    "ort": ("fused", "gather", "capacity", "dense"),
    "onnx": ("gather", "capacity", "dense"),
    "trt": ("capacity", "gather", "dense"),
    "torch": ("kernel", "grouped_mm"),
}
# the exact lowering a block falls back to when the preferred one does not fit it
EXACT_DEFAULT = {"ort": "gather", "onnx": "gather", "trt": "gather", "torch": "kernel"}


def unsupported_reasons(spec: MoESpec, lowering: str) -> list[str]:
    """Why ``lowering`` cannot compute this block (empty: it can)."""
    if spec.expert_kind == "module":
        return ["its experts are modules, which only the gather -> subgraph -> scatter path runs"]
    if lowering == "fused":
        return fused_unsupported_reasons(spec)
    if lowering == "capacity" and spec.routing == "expert_choice":
        return ["expert-choice routing has no fixed k per token to give capacity slots"]
    if lowering == "grouped_mm":
        sizes = {"hidden": spec.hidden_size, "expert": spec.expert_size}
        return [
            f"torch._grouped_mm needs sizes divisible by {GROUPED_MM_ALIGN}: {name} size is {n}"
            for name, n in sizes.items()
            if n % GROUPED_MM_ALIGN
        ]
    return []
