"""The MoE IR: `MoESpec` (plain-data block configuration), `MoEWeights` (stacked tensors), the
`moec::moe` operator with its eager reference kernel, routing, the program signature
(`TensorSpec`) and the captured program (`CapturedProgram`).

It imports nothing else in moec but `moec.errors` and `moec.registry` (whose hooks may import a
lowering's module when its check runs), so the compiler, the models and the runtime can all use
it. Names are imported on first use: `moec.ir.signature`
needs no torch (a deployed ONNX artifact's runtime reads it); ``torch.ops.moec.moe`` is
registered when `moec.ir.moe_op` is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PLAIN_ACTIVATION_FUNCTIONS",
    "WEIGHT_NAMES",
    "CapturedBlock",
    "CapturedProgram",
    "DynamicDim",
    "MoEOpArgs",
    "MoESpec",
    "MoEWeights",
    "TensorSpec",
    "map_experts",
    "moe_eager",
    "moe_nodes",
    "near_tie_margin",
    "route",
    "router_logits",
]

_HOME = {
    "PLAIN_ACTIVATION_FUNCTIONS": "moec.ir.expert_kernels",
    "WEIGHT_NAMES": "moec.ir.moe_weights",
    "MoEWeights": "moec.ir.moe_weights",
    "MoEOpArgs": "moec.ir.moe_op",
    "moe_eager": "moec.ir.moe_op",
    "MoESpec": "moec.ir.moe_spec",
    "map_experts": "moec.ir.routing",
    "near_tie_margin": "moec.ir.routing",
    "route": "moec.ir.routing",
    "router_logits": "moec.ir.routing",
    "DynamicDim": "moec.ir.signature",
    "TensorSpec": "moec.ir.signature",
    "CapturedBlock": "moec.ir.program",
    "CapturedProgram": "moec.ir.program",
    "moe_nodes": "moec.ir.program",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'moec.ir' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
