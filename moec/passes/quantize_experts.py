"""``quantize-experts``: store each MoE block's expert matrices as int8 or int4 codes.

Weight-only, round-to-nearest per block of ``block_size`` weights along each matrix's input dim
(`moec.ir.quantized_experts`), symmetric or with a zero point per block. Routers, biases, shared
experts and every other layer stay as they were. The block's spec records the format, and the
lowerings run it as their target can (ONNX Runtime's ``QMoE``, blocked ``DequantizeLinear``,
PyTorch's weight-only kernels); the reference is the dequantised block.
"""

from __future__ import annotations

import dataclasses

from moec.compiler.moe_block import op_block
from moec.errors import MoecError
from moec.ir.moe_spec import MoESpec
from moec.ir.quantized_experts import quantize_block
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

    def call(self, state: CompressionState) -> PassResult[CompressionState]:
        bits, block = QUANTIZE_BITS[self.options.bits], self.options.block_size
        names = state.moe_blocks()
        if not names:
            raise MoecError(
                f"--quantize {self.options.bits} quantises MoE experts, and the passes before "
                "it left no MoE block; drop --quantize or the pass that replaced the blocks"
            )
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
        report = {**dataclasses.asdict(self.options), "blocks": blocks}
        return PassResult(state, True, report)


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
