"""Quantised experts in ONNX: codes and scales as stored by ``quantize-experts``, turned into
ONNX's blocked ``DequantizeLinear`` (opset 21) inputs.

A symmetric block's codes become signed (int4/int8, zero point 0: what TensorRT takes); an
asymmetric one's stay unsigned (uint4/uint8) with its zero points. The casts and the blocking
are ops on initializers, folded by the optimizer; ``DequantizeLinear`` itself stays in the graph,
so the artifact stores the packed codes and the weights are dequantised as the model runs.
"""

from __future__ import annotations

import onnx
from onnxscript import opset21

import moec.ir.dequantize_op  # noqa: F401  (registers torch.ops.moec.dequantize)
from moec.compiler.onnx_ops import op
from moec.ir import MoESpec
from moec.ir.moe_weights import QUANT_WEIGHTS, QUANTIZED

__all__ = ["QUANT_OPSET", "dequantized_weights", "translate_dequantize"]

QUANT_OPSET = 21  # blocked DequantizeLinear, int4/uint4
INT16 = onnx.TensorProto.INT16
SIGNED = {4: onnx.TensorProto.INT4, 8: onnx.TensorProto.INT8}
UNSIGNED = {4: onnx.TensorProto.UINT4, 8: onnx.TensorProto.UINT8}


def signed_codes(codes, bits: int):
    """uint8 codes of a symmetric block as signed integers of ``bits`` bits (zero point 0)."""
    mid = op.Cast(op.Constant(value_int=2 ** (bits - 1)), to=INT16)
    return op.Cast(op.Sub(op.Cast(codes, to=INT16), mid), to=SIGNED[bits])


def dequantize(codes, scale, zero, bits: int, block: int, axis: int):
    """``DequantizeLinear`` of ``codes`` with blocks of ``block`` along ``axis``."""
    if zero is None:
        signed = signed_codes(codes, bits)
        return opset21.DequantizeLinear(signed, scale, axis=axis, block_size=block)
    typed = op.Cast(codes, to=UNSIGNED[bits])
    return opset21.DequantizeLinear(
        typed, scale, op.Cast(zero, to=UNSIGNED[bits]), axis=axis, block_size=block
    )


def translate_dequantize(codes, scale, zero, bits: int, block_size: int):
    """torch.onnx translation of ``moec::dequantize`` (a weight [N, K], blocks along K)."""
    return dequantize(codes, scale, zero, bits, block_size, axis=1)


def dequantized_weights(spec: MoESpec, w: dict) -> tuple[MoESpec, dict]:
    """A quantised block's spec and weights as the float block they stand for, in ONNX values
    (other blocks as they are)."""
    if spec.weight_bits is None:
        return spec, w
    out = {k: v for k, v in w.items() if k not in QUANT_WEIGHTS}
    for name in QUANTIZED:
        if name in w:
            k = spec.hidden_size if name != "w_down" else spec.expert_size
            block = spec.weight_block_size or k
            scale, zero = w[f"{name}_scale"], w.get(f"{name}_zero")
            out[name] = dequantize(w[name], scale, zero, spec.weight_bits, block, axis=2)
    return spec.dequantized(), out
