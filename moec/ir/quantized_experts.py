"""Weight-only quantised experts: round-to-nearest codes per block along K, and back.

A stacked expert matrix ``w`` [E, N, K] becomes uint8 codes [E, N, K] in [0, 2^bits), a float
scale per block of ``block`` weights along K ([E, N, K/block]; ``block`` None: one per row) and,
unless symmetric, a uint8 zero point per block; a weight is ``(code - zero) * scale`` (the zero
point of a symmetric block is ``2^(bits-1)``). This is the layout of ONNX Runtime's
``MatMulNBits``/``QMoE`` before packing, and of ONNX's blocked ``DequantizeLinear``.
"""

from __future__ import annotations

import dataclasses

import torch

from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import QUANT_WEIGHTS, QUANTIZED, MoEWeights

__all__ = ["dequantize", "dequantized_block", "expert_matrix", "quantize", "quantize_block"]


def _blocks(w: torch.Tensor, block: int | None) -> torch.Tensor:
    """[..., N, K] -> [..., N, K/block, block]."""
    size = block or w.shape[-1]
    return w.reshape(*w.shape[:-1], w.shape[-1] // size, size)


def quantize(
    w: torch.Tensor, bits: int, block: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest (codes uint8, scale float32, zero uint8 or None) of ``w`` [..., N, K]."""
    blocks = _blocks(w.detach().float(), block)
    top = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        scale = blocks.abs().amax(-1) / (mid - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (blocks / scale.unsqueeze(-1)).round().clamp(1 - mid, mid - 1) + mid
        zero = None
    else:  # the range [min, max] of each block, widened to hold 0 exactly
        low = blocks.amin(-1).clamp(max=0)
        high = blocks.amax(-1).clamp(min=0)
        scale = (high - low) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = (-low / scale).round().clamp(0, top)
        codes = ((blocks / scale.unsqueeze(-1)).round() + zero.unsqueeze(-1)).clamp(0, top)
        zero = zero.to(torch.uint8)
    return codes.reshape(w.shape).to(torch.uint8), scale, zero


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The weights [..., N, K] that ``codes`` and their blocks' ``scale``/``zero`` stand for, in
    ``dtype`` (default: the scale's): computed in the scale's dtype, as ``DequantizeLinear``."""
    block = codes.shape[-1] // scale.shape[-1]
    offset = 2 ** (bits - 1) if zero is None else zero.to(scale.dtype).unsqueeze(-1)
    centred = _blocks(codes, block).to(scale.dtype) - offset
    w = (centred * scale.unsqueeze(-1)).reshape(codes.shape)
    return w if dtype is None else w.to(dtype)


def quantize_block(
    spec: MoESpec, weights: MoEWeights, bits: int, block: int | None, symmetric: bool
) -> tuple[MoESpec, MoEWeights]:
    """The block with its expert matrices quantised (round-to-nearest)."""
    tensors = {}
    for name in QUANTIZED:
        w = getattr(weights, name)
        if w is None:
            continue
        codes, scale, zero = quantize(w, bits, block, symmetric)
        tensors.update({name: codes, f"{name}_scale": scale.to(w.dtype), f"{name}_zero": zero})
    spec = dataclasses.replace(
        spec, weight_bits=bits, weight_block_size=block, weight_symmetric=symmetric
    )
    return spec, dataclasses.replace(weights, **tensors)


def dequantized_block(spec: MoESpec, weights: MoEWeights) -> tuple[MoESpec, MoEWeights]:
    """A quantised block as the float block it stands for (other blocks as they are)."""
    if spec.weight_bits is None:
        return spec, weights
    tensors: dict[str, torch.Tensor | None] = dict.fromkeys(QUANT_WEIGHTS)
    for name in QUANTIZED:
        codes = getattr(weights, name)
        if codes is not None:
            scale = getattr(weights, f"{name}_scale")
            zero = getattr(weights, f"{name}_zero")
            tensors[name] = dequantize(codes, scale, zero, spec.weight_bits)
    return spec.dequantized(), dataclasses.replace(weights, **tensors)


def expert_matrix(spec: MoESpec, weights: MoEWeights, name: str, e: int) -> torch.Tensor:
    """Expert ``e``'s float matrix ``name`` (one of `QUANTIZED`): dequantised from its codes
    alone where the block is quantised (the same values as `dequantized_block`'s)."""
    w = getattr(weights, name)[e]
    if spec.weight_bits is None:
        return w
    zero = getattr(weights, f"{name}_zero")
    scale = getattr(weights, f"{name}_scale")[e]
    return dequantize(w, scale, None if zero is None else zero[e], spec.weight_bits)
