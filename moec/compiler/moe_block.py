"""`MoEBlock`: the module capture puts in place of a recognised MoE block.

Its forward is one call to ``torch.ops.moec.moe``, so the exported graph holds one node per
block with the stacked expert weights as parameters. The routing mask the op returns is appended
to ``routing_sink`` when capture sets one, for the capture wrapper to expose as an output.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moec.ir import WEIGHT_NAMES, MoESpec, MoEWeights

__all__ = ["MoEBlock"]


class MoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, weights: MoEWeights):
        super().__init__()
        weights.check(spec)
        self.spec = spec
        self.spec_json = spec.to_json()
        for name in WEIGHT_NAMES:
            tensor = getattr(weights, name)
            param = None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)
            self.register_parameter(name, param)
        self.routing_sink: list[torch.Tensor] | None = None

    def to_moe(self) -> tuple[MoESpec, MoEWeights]:
        """The block's IR, so that a model built from MoEBlocks is recognised like any other."""
        tensors = {name: getattr(self, name) for name in WEIGHT_NAMES}
        weights = MoEWeights(**{k: None if v is None else v.detach() for k, v in tensors.items()})
        return dataclasses.replace(self.spec, lowering=None), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = [getattr(self, name) for name in WEIGHT_NAMES]
        out, chosen = torch.ops.moec.moe(x, *args, self.spec_json)
        if self.routing_sink is not None:
            self.routing_sink.append(chosen)
        return out
