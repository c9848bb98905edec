"""`QuantizedLinear`: a linear layer whose weight is stored as int8/int4 codes with a scale per
block along its input dim (``--quantize-dense``), dequantised where it is used by the
``moec::dequantize`` op (so that ONNX keeps the codes and dequantises them as the model runs)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moec.ir.dequantize_op import dequantize
from moec.ir.quantized_experts import quantize

__all__ = ["QuantizedLinear"]


class QuantizedLinear(nn.Module):
    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
    ):
        super().__init__()
        self.bits = bits
        self.block_size = codes.shape[-1] // scale.shape[-1]
        for name, tensor in (("codes", codes), ("scale", scale), ("zero", zero), ("bias", bias)):
            param = None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)
            self.register_parameter(name, param)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, block: int | None, symmetric: bool
    ) -> QuantizedLinear:
        codes, scale, zero = quantize(linear.weight, bits, block, symmetric)
        return cls(codes, scale.to(linear.weight.dtype), zero, linear.bias, bits)

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def record(self) -> dict[str, Any]:
        """What the manifest stores to rebuild it (`moec.passes.compress`)."""
        return {"bits": self.bits, "in_features": self.in_features, "out": self.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.codes, self.scale, self.zero, self.bits, self.block_size)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias)
