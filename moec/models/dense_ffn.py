"""`DenseFFN`: the dense feed-forward layer a distilled MoE block becomes.

Its configuration is a one-expert `MoESpec` (the expert's kind, activation and width, and a
shared expert kept beside it when it could not be folded in); it computes that one expert on
every token with plain linear layers, so it exports as standard ops on every target. Standing in
for a transformers experts module, it takes and ignores the routing the family's router hands it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moec.ir import WEIGHT_NAMES, MoESpec, MoEWeights
from moec.ir.expert_kernels import expert_hidden, shared_ffn

__all__ = ["DenseFFN", "dense_ffn_out"]


class DenseFFN(nn.Module):
    def __init__(self, spec: MoESpec, weights: MoEWeights):
        super().__init__()
        if spec.num_experts != 1 or spec.routing != "external":
            raise ValueError("DenseFFN takes a one-expert spec with external routing")
        weights.check(spec)
        self.spec = spec
        for name in WEIGHT_NAMES:
            tensor = getattr(weights, name)
            param = None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)
            self.register_parameter(name, param)

    @property
    def weights(self) -> MoEWeights:
        return MoEWeights(**{name: getattr(self, name) for name in WEIGHT_NAMES})

    def forward(self, x: torch.Tensor, *routing, **kwargs) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        w = self.weights
        out = dense_ffn_out(self.spec, w, flat)
        if self.spec.shared_expert_size:  # kept beside the dense FFN (a gated shared expert)
            out = out + shared_ffn(self.spec, w, flat, project=F.linear)
        if w.output_bias is not None:
            out = out + w.output_bias
        return out.reshape(x.shape)


def dense_ffn_out(spec: MoESpec, w: MoEWeights, x: torch.Tensor) -> torch.Tensor:
    """The one expert of a one-expert spec on every row of ``x`` [n, H] (no shared, no bias)."""
    b_down = None if w.b_down is None else w.b_down[0]
    return F.linear(expert_hidden(spec, w, 0, x), w.w_down[0], b_down)
