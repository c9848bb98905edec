"""The ``moec::dequantize`` operator: a weight stored as integer codes, dequantised where it is
used (a layer quantised by ``--quantize-dense``).

``torch.ops.moec.dequantize(codes, scale, zero, bits, block_size) -> weight``: ``codes`` uint8
[..., K] in [0, 2^bits), ``scale`` [..., K / block_size], ``zero`` uint8 like ``scale`` or None
(then ``2^(bits-1)``); the weight is ``(code - zero) * scale`` in the scale's dtype
(`moec.ir.quantized_experts.dequantize`). ONNX lowers it to a blocked ``DequantizeLinear``, so the
artifact keeps the codes.
"""

from __future__ import annotations

import torch

from moec.ir.quantized_experts import dequantize as dequantize_codes

__all__ = ["dequantize"]


@torch.library.custom_op("moec::dequantize", mutates_args=())
def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, block_size: int
) -> torch.Tensor:
    return dequantize_codes(codes, scale, zero, bits)


@dequantize.register_fake
def _dequantize_fake(codes, scale, zero, bits, block_size):
    return codes.new_empty(codes.shape, dtype=scale.dtype)
