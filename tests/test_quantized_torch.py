"""Quantised experts on the ``torch`` target: PyTorch's weight-only int kernels (int4 groups,
int8 rows) packed at load, per-expert dequantisation for the layouts they cannot take, and the
same numbers as the dequantised block."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from moe_cases import CASES, random_weights

import moec
from moec.ir.expert_kernels import ONEDNN
from moec.ir.moe_op import moe_eager
from moec.ir.quantized_experts import dequantize, dequantized_block, quantize, quantize_block
from moec.runtime.quantized_gemm import QuantizedGemm
from moec.runtime.weight_packing import PackedMoE

pytestmark = pytest.mark.skipif(not ONEDNN, reason="this torch is built without oneDNN")
INT4, INT8 = "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm"
ROWS = [(1, 1), (1, 13), (4, 32)]  # batch, sequence


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "bits, block, k, kernel",
    [
        (4, 32, 128, INT4),
        (4, 64, 128, INT4),
        (4, None, 256, INT4),  # one group of the row
        (4, None, 768, INT4),  # the row's scale repeated over groups of 256
        (4, 512, 1024, INT4),
        (8, None, 128, INT8),
        (4, 16, 128, None),  # finer than any int4 group: dequantised per call
        (8, 32, 128, None),  # int8 takes one scale per row
    ],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_matches_the_dequantised_weight(bits, block, k, kernel, symmetric):
    g = torch.Generator().manual_seed(k + bits)
    w = torch.randn(48, k, generator=g) + 0.3 * symmetric  # off-centre rows: zero points move
    codes, scale, zero = quantize(w, bits, block, symmetric)
    gemm = QuantizedGemm(codes, scale, zero, bits)
    assert gemm.kernel == kernel
    reference = dequantize(codes, scale, zero, bits)
    bias = torch.randn(48, generator=g)
    for shape in [(1, k), (1, 1, k), (37, k), (2, 9, k)]:
        x = torch.randn(shape, generator=g)
        assert rel_l2(gemm(x, bias), x @ reference.T + bias) <= 2e-6, shape


def quantized_case(bits: int, block: int | None, symmetric: bool):
    spec = dataclasses.replace(CASES["mixtral"], hidden_size=64, expert_size=96)
    return quantize_block(spec, random_weights("mixtral", 4, spec), bits, block, symmetric)


@pytest.mark.parametrize(
    "bits, block, symmetric", [(4, 32, False), (4, None, True), (8, None, False), (4, 16, True)]
)
def test_packed_block_matches_the_dequantised_block(bits, block, symmetric):
    spec, weights = quantized_case(bits, block, symmetric)
    packed = PackedMoE(spec, weights)
    kernels = {gemm.kernel for gemm in packed.first + packed.down}
    assert kernels == ({INT4 if bits == 4 else INT8} if block != 16 else {None})
    float_spec, float_weights = dequantized_block(spec, weights)
    for b, s in ROWS:
        x = torch.randn(b, s, spec.hidden_size, generator=torch.Generator().manual_seed(b * s))
        with torch.no_grad():
            got, chosen = packed(x)
            want, want_chosen = moe_eager(float_spec, float_weights, x)
        assert torch.equal(chosen, want_chosen)
        assert rel_l2(got, want) <= 1e-6, (b, s)


def test_op_kernel_dequantises_only_the_chosen_experts(monkeypatch):
    """Unpacked (``pack=False``, other devices): the op's kernel reads the quantised block and
    dequantises each chosen expert's matrices, with the dequantised block's numbers."""
    spec, weights = quantized_case(4, 32, False)
    spec = spec.with_lowering("kernel")
    x = torch.randn(1, 1, spec.hidden_size)
    dequantised = []
    real = dequantize

    def counting(codes, *args, **kwargs):
        dequantised.append(codes.shape)
        return real(codes, *args, **kwargs)

    want, _ = moe_eager(*dequantized_block(spec, weights), x)
    monkeypatch.setattr("moec.ir.quantized_experts.dequantize", counting)
    got, _ = moe_eager(spec, weights, x)
    assert len(dequantised) == 3 * spec.top_k and all(len(s) == 2 for s in dequantised)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def lm_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (24, 32)))
    return path


@pytest.mark.parametrize(
    "quantize, block_size, symmetric, kernel",
    [
        ("int4", 32, False, INT4),
        ("int4", 32, True, INT4),
        ("int4", 0, False, INT4),
        ("int8", 0, False, INT8),
        ("int8", 0, True, INT8),
        ("int4", 16, True, "dequantised"),
    ],
)
def test_quantized_lm_verifies(tmp_path, lm_calibration, quantize, block_size, symmetric, kernel):
    result = moec.compile(
        "zoo:mixtral-lm",
        target="torch",
        output=tmp_path / "a",
        calib=lm_calibration,
        quantize=quantize,
        block_size=block_size,
        symmetric=symmetric,
    )
    assert all(kernel in block.reason for block in result.blocks)
    with moec.load(result.path) as runner:
        assert runner.packing.moe_blocks == len(result.blocks)
    assert moec.verify(result.path)
