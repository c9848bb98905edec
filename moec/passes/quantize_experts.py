"""``quantize-experts``: store each MoE block's expert matrices as int8 or int4 codes.

Weight-only, round-to-nearest per block of ``block_size`` weights along each matrix's input dim
(`moec.ir.quantized_experts`), symmetric or with a zero point per block. Routers, biases and
shared experts stay as they were; with ``dense`` the model's linear layers outside its MoE
blocks are quantised the same way (`QuantizedLinear`). The block's spec records the format, and the
lowerings run it as their target can (ONNX Runtime's ``QMoE``, blocked ``DequantizeLinear``,
PyTorch's weight-only kernels); the reference is the dequantised block.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from moec.compiler.moe_block import op_block
from moec.errors import MoecError
from moec.ir.moe_spec import MoESpec
from moec.ir.quantized_experts import quantize_block
from moec.models.quantized_linear import QuantizedLinear
from moec.passes.compression_state import CompressionState
from moec.passes.pass_base import Pass, PassResult
from moec.passes.quality import stored_bytes
from moec.settings import QUANTIZE_BITS, QuantizeOptions

__all__ = ["QuantizeExpertsPass"]


class QuantizeExpertsPass(Pass[CompressionState]):
    name = "quantize-experts"
    description = "store expert weights as int8/int4 codes with a scale per block (weight-only)"
    in_place = True  # it replaces blocks of the state it is given
    lossy = True

    def __init__(self, options: QuantizeOptions):
        self.options = options
        self.needs_moe_blocks = False  # it says itself what to do with a model without any

    def call(self, state: CompressionState) -> PassResult[CompressionState]:
        bits, block = QUANTIZE_BITS[self.options.bits], self.options.block_size
        names = state.moe_blocks()
        if not names and not self.options.dense:
            why = "; ".join(f"{n or '(model)'}: {r}" for n, r in state.skipped.items())
            raise MoecError(
                f"--quantize {self.options.bits} quantises MoE experts, and the model has no "
                f"MoE block with FFN experts{f' ({why})' if why else ''} or the passes before "
                "it replaced them; add --quantize-dense to quantise its linear layers, or drop "
                "--quantize"
            )
        layers = _linear_layers(state) if self.options.dense else {}
        blocks = []
        for name in names:
            spec, weights = state.moe(name)
            if spec.weight_bits is not None:
                raise MoecError(f"block {name or '(model)'} is already quantised")
            _check_block_size(spec, block, self.options.bits, name)
            before = stored_bytes(state.blocks[name])
            new_spec, new_weights = quantize_block(
                spec, weights, bits, block, self.options.symmetric
            )
            state.replace(name, op_block(new_spec, new_weights))
            blocks.append(
                {
                    "block": name,
                    "bytes_before": before,
                    "bytes_after": stored_bytes(state.blocks[name]),
                }
            )
        for name, linear in layers.items():
            before = stored_bytes(linear)
            _check_layer_block_size(linear, block, self.options.bits, name)
            state.replace(
                name, QuantizedLinear.from_linear(linear, bits, block, self.options.symmetric)
            )
            blocks.append(
                {
                    "layer": name,
                    "bytes_before": before,
                    "bytes_after": stored_bytes(state.blocks[name]),
                }
            )
        report = {**dataclasses.asdict(self.options), "blocks": blocks}
        return PassResult(state, bool(blocks), report)


def _linear_layers(state: CompressionState) -> dict[str, nn.Linear]:
    """The model's linear layers outside its MoE blocks (converted or left alone)."""
    inside = tuple(f"{name}." for name in [*state.blocks, *state.skipped])
    if "" in state.blocks:
        return {}  # the model is one MoE block
    return {
        name: module
        for name, module in state.model.named_modules()
        if isinstance(module, nn.Linear) and name and not name.startswith(inside)
    }


def _check_layer_block_size(linear: nn.Linear, block: int | None, bits: str, name: str) -> None:
    if block is not None and linear.in_features % block:
        raise MoecError(
            f"--quantize {bits} --quantize-dense --block-size {block}: the block size does not "
            f"divide the {linear.in_features} inputs of linear layer {name}; give a block size "
            "that divides every layer's inputs, or --block-size 0 for one scale per row"
        )


def _check_block_size(spec: MoESpec, block: int | None, bits: str, name: str) -> None:
    if block is None:
        return
    sizes = {"hidden size": spec.hidden_size, "expert size": spec.expert_size}
    bad = [f"{what} {size}" for what, size in sizes.items() if size % block]
    if not bad:
        return
    fits = [b for b in (16, 32, 64, 128, 256) if all(s % b == 0 for s in sizes.values())]
    fix = (
        f"--block-size {' or '.join(map(str, fits))} divide(s) both"
        if fits
        else "no power-of-2 block of 16 or more divides both"
    )
    raise MoecError(
        f"--quantize {bits} --block-size {block}: the block size does not divide the "
        f"{' and the '.join(bad)} of block {name or '(model)'}; {fix}, and --block-size 0 "
        "gives one scale per row"
    )
