"""`QuantizedGemm`: ``x @ weight.T`` for one weight-only quantised matrix (codes, scales and zero
points as `moec.ir.quantized_experts` stores them), packed once for PyTorch's int kernels.

- int4 with blocks of 32 weights or more (a row is one block): ``_weight_int4pack_mm_for_cpu`` with
  groups of the largest of `INT4_GROUPS` that divides the block (a larger block's scale is
  repeated over its groups). Its scales and zeros are ``w = (q - 8) * scale + zero``, so a stored
  zero point ``z`` becomes ``zero = (8 - z) * scale``; it needs N divisible by `INT4_N_MULTIPLE`.
- int8 with one scale per row: ``_weight_int8pack_mm`` on ``code - 128`` (int8) and the row
  scales; a row's zero point ``z`` other than 128 subtracts ``(z - 128) * scale * sum(x)``.
- anything else (int4 blocks of 16, int8 blocks, other devices): the matrix is dequantised for
  each call (one expert's matrix, not the block's).

The int kernels read float32 activations as they are (bfloat16 and float16 ones too, in their own
dtype), so float32 results match the dequantised weights' GEMM up to accumulation order. On
float32 rows their CPU loops run row by row without vectorising: beyond `INT_KERNEL_MAX_ROWS`
rows, dequantising the one matrix and one oneDNN GEMM measured faster on every layout (bfloat16
rows are fast, but rounding float32 activations to bfloat16 costs about 3e-3 relative error).
"""

from __future__ import annotations

import torch

from moec.ir.expert_kernels import linear
from moec.ir.moe_spec import MoESpec
from moec.ir.quantized_experts import dequantize

__all__ = ["INT4_GROUPS", "QuantizedGemm", "int_kernel", "quantized_kernel_note"]

INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu takes, largest first
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs rows in tiles of this many
INT4_CENTRE, INT8_CENTRE = 8, 128
INT_KERNEL_MAX_ROWS = 1  # float32 rows up to which the int kernels beat dequantise + GEMM
INT4_KERNEL = "_weight_int4pack_mm_for_cpu"
INT8_KERNEL = "_weight_int8pack_mm"


def int4_group(block: int) -> int | None:
    """The int4 kernel's group size for blocks of ``block`` weights (None: it takes none)."""
    return next((g for g in INT4_GROUPS if block % g == 0), None)


def int_kernel(bits: int, block: int | None, out_features: int, in_features: int) -> str | None:
    """The int kernel that runs an [out, in] matrix of ``bits`` codes with blocks of ``block``
    weights along ``in`` (None: per row) on the CPU, or None where none does."""
    if bits == 8:
        return INT8_KERNEL if block is None else None
    if out_features % INT4_N_MULTIPLE or int4_group(block or in_features) is None:
        return None
    return INT4_KERNEL


def quantized_kernel_note(spec: MoESpec) -> str:
    """How the ``kernel`` lowering runs a quantised block's experts on the CPU ('' for a float
    block): the int kernel of each projection, or why each chosen expert's matrices are
    dequantised per call."""
    if spec.weight_bits is None:
        return ""
    bits, block = spec.weight_bits, spec.weight_block_size
    first = spec.expert_size * (2 if spec.expert_kind == "gated" else 1)
    shapes = {"gate/up": (first, spec.hidden_size), "down": (spec.hidden_size, spec.expert_size)}
    kernels = {name: int_kernel(bits, block, *shape) for name, shape in shapes.items()}
    layout = f"int{bits} blocks of {block}" if block else f"int{bits} per row"
    if all(kernels.values()):
        kernel = INT4_KERNEL if bits == 4 else INT8_KERNEL
        return (
            f"{layout}: torch's {kernel} on the CPU at {INT_KERNEL_MAX_ROWS} row per expert, "
            "each chosen expert's matrices dequantised for the call at more (faster there)"
        )
    needs = (
        f"{INT8_KERNEL} takes one scale per row"
        if bits == 8
        else f"{INT4_KERNEL} takes groups of {'/'.join(map(str, INT4_GROUPS[::-1]))} weights "
        f"and rows in multiples of {INT4_N_MULTIPLE}"
    )
    slow = [name for name, kernel in kernels.items() if kernel is None]
    return (
        f"{layout}: {needs}, so the {' and '.join(slow)} matrices of each chosen expert are "
        "dequantised for the call"
    )


class QuantizedGemm:
    """One quantised [out, in] matrix: uint8 ``codes`` [N, K], ``scale`` [N, K/B] and ``zero``
    [N, K/B] (None: symmetric); ``gemm(x [..., K], bias) -> [..., N]``. Packed for the int kernel
    of its layout (`int_kernel`) on the CPU, for calls of at most `INT_KERNEL_MAX_ROWS` rows;
    other calls dequantise the matrix from its codes."""

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
    ):
        self.out_features, self.in_features = codes.shape
        block = self.in_features // scale.shape[-1]
        per_row = scale.shape[-1] == 1
        self.kernel = None
        if codes.device.type == "cpu":
            self.kernel = int_kernel(bits, None if per_row else block, *codes.shape)
        self.bits = bits
        if self.kernel == INT4_KERNEL:
            group = int4_group(block)
            self.group = group
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32), 1
            )
            self.scales_and_zeros = _int4_scales_and_zeros(scale, zero, block // group)
        elif self.kernel == INT8_KERNEL:
            self.packed = (codes.to(torch.int16) - INT8_CENTRE).to(torch.int8)
            self.scales = scale[:, 0].contiguous()
            self.row_shift = None  # (z - 128) * scale per row, where some z is not 128
            if zero is not None and (zero != INT8_CENTRE).any():
                self.row_shift = (zero[:, 0].to(scale.dtype) - INT8_CENTRE) * scale[:, 0]
        self.codes, self.scale, self.zero = codes, scale, zero  # the artifact's own tensors

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.kernel is None or rows > INT_KERNEL_MAX_ROWS:
            return linear(x, dequantize(self.codes, self.scale, self.zero, self.bits), bias)
        flat = x.reshape(-1, self.in_features).contiguous()
        if self.kernel == INT4_KERNEL:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.packed, self.group, self.scales_and_zeros
            )
        else:
            out = torch._weight_int8pack_mm(flat, self.packed, self.scales)
            if self.row_shift is not None:
                out = out - flat.sum(-1, keepdim=True) * self.row_shift
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias


def _int4_scales_and_zeros(
    scale: torch.Tensor, zero: torch.Tensor | None, repeat: int
) -> torch.Tensor:
    """The int4 kernel's [K/group, N, 2] (scale, zero) of blocks ``scale``/``zero`` [N, K/B],
    each block's repeated over its ``repeat`` groups: ``zero = (8 - z) * scale``."""
    z = INT4_CENTRE if zero is None else zero.to(scale.dtype)
    pairs = torch.stack([scale, (INT4_CENTRE - z) * scale], -1)  # [N, K/B, 2]
    return pairs.repeat_interleave(repeat, dim=1).transpose(0, 1).contiguous()
