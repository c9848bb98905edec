"""The MoE IR: `MoESpec` (plain-data block configuration), `MoEWeights` (stacked tensors), the
`moec::moe` operator with its eager reference kernel, and routing.

Importing this package registers ``torch.ops.moec.moe``. It depends on nothing else in moec but
`moec.errors`, so the compiler, the models and the runtime can all use it.
"""

from __future__ import annotations

from moec.ir.moe_op import PLAIN_ACTIVATION_FUNCTIONS, WEIGHT_NAMES, MoEWeights, moe_eager
from moec.ir.moe_spec import MoESpec
from moec.ir.routing import map_experts, near_tie_margin, route, router_logits

__all__ = [
    "PLAIN_ACTIVATION_FUNCTIONS",
    "WEIGHT_NAMES",
    "MoESpec",
    "MoEWeights",
    "map_experts",
    "moe_eager",
    "near_tie_margin",
    "route",
    "router_logits",
]
