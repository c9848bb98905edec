"""ONNX Runtime's ``com.microsoft.QMoE`` inputs from a quantised block's stored codes.

``QMoE`` (onnxruntime CPU) takes each expert matrix as its uint8 codes [E, N, K] packed along K
(int4: two a byte, low nibble first), its scales [E, N, K/block] with the ``block_size``
attribute, or [E, N] without it (one scale per row), and, for an asymmetric block, its zero
points packed the same way along their last axis and padded to a whole byte ([E, N, K/block]
or [E, N] before packing). Without zero points it takes ``2^(bits-1)``, the symmetric zero
point of `moec.ir.quantized_experts`. The packing is ops on initializers, folded by the
optimizer, so the artifact stores the packed codes and ``QMoE`` dequantises inside its GEMMs.
"""

from __future__ import annotations

import numpy as np
import onnx

from moec.compiler.onnx_ops import const_i, op
from moec.ir import MoESpec

__all__ = ["qmoe_attributes", "qmoe_matrix", "qmoe_note", "qmoe_unsupported_reasons"]


def qmoe_unsupported_reasons(spec: MoESpec) -> list[str]:
    """Why ``com.microsoft.QMoE`` cannot run this quantised block exactly (empty: it can); such
    a block runs ``com.microsoft.MoE`` on its dequantised weights instead."""
    reasons = []
    if spec.weight_bits == 8 and spec.weight_block_size is not None:
        reasons.append(
            "com.microsoft.QMoE's blockwise int8 experts on CPU quantise the activations to "
            "int8 too (no float kernel), which is measurably off the dequantised block; "
            "int8 with one scale per row (--block-size 0) runs in QMoE"
        )
    odd = [
        f"{what} {size}"
        for what, size in (("hidden size", spec.hidden_size), ("expert size", spec.expert_size))
        if spec.weight_bits == 4 and size % 2
    ]
    if odd:
        reasons.append(
            "com.microsoft.QMoE packs two int4 codes a byte along each row; the "
            f"{' and '.join(odd)} is odd"
        )
    return reasons


def qmoe_note(spec: MoESpec) -> str:
    """How the ``fused`` lowering runs a quantised block, for the reason it was chosen."""
    if spec.weight_bits is None:
        return ""
    reasons = qmoe_unsupported_reasons(spec)
    if reasons:
        return f"com.microsoft.MoE on the dequantised experts: {'; '.join(reasons)}"
    return f"com.microsoft.QMoE on the int{spec.weight_bits} codes"


def qmoe_attributes(spec: MoESpec) -> dict:
    """The quantisation attributes of ``QMoE`` for this block."""
    attrs = {"expert_weight_bits": spec.weight_bits}
    if spec.weight_block_size is not None:
        attrs["block_size"] = spec.weight_block_size
    return attrs


def qmoe_matrix(spec: MoESpec, codes, scale, zero, like):
    """(packed codes, scales cast like ``like``, packed zero points or None) of one stacked
    matrix: ``codes`` [E, N, K] uint8, ``scale`` and ``zero`` [E, N, K/block]."""
    if spec.weight_block_size is None:  # one scale per row: QMoE's per-column form [E, N]
        scale = op.Squeeze(scale, const_i([2]))
        zero = None if zero is None else op.Squeeze(zero, const_i([2]))
    packed_zero = None if zero is None else _pack(zero, spec.weight_bits)
    return _pack(codes, spec.weight_bits), op.CastLike(scale, like), packed_zero


def _pack(codes, bits: int):
    """uint8 codes packed along the last axis: int4 two a byte, low nibble first (an odd
    length padded with a zero code); int8 as they are."""
    if bits == 8:
        return codes
    length = op.Shape(codes, start=-1)
    odd = op.Mod(length, const_i([2]))
    codes = op.Pad(codes, op.Concat(const_i([0]), odd, axis=0), axes=const_i([-1]))
    low = op.Slice(codes, const_i([0]), const_i([2**62]), const_i([-1]), const_i([2]))
    high = op.Slice(codes, const_i([1]), const_i([2**62]), const_i([-1]), const_i([2]))
    nibble = op.Constant(value=onnx.numpy_helper.from_array(np.array(4, dtype=np.uint8)))
    return op.BitwiseOr(low, op.BitShift(high, nibble, direction="LEFT"))
