"""`PackedGemm`: the packed weight read by MKL through a view of oneDNN's blocked layout, or by
oneDNN, computes x @ weight.T either way; the view is no copy, and layouts it cannot read keep
every call on oneDNN."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from moe_cases import CASES, random_weights

from moec.ir.expert_kernels import ONEDNN
from moec.ir.moe_op import moe_eager
from moec.runtime import packed_gemm
from moec.runtime.packed_gemm import PROBE_ROWS, PackedGemm, mkl_rows_limit
from moec.runtime.weight_packing import PackedMoE

pytestmark = pytest.mark.skipif(not ONEDNN, reason="this torch is built without oneDNN")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("out_features, in_features", [(128, 64), (192, 48), (64, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_both_libraries_compute_the_linear(out_features, in_features, bias):
    g = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    gemm = PackedGemm(weight, mkl_rows=4)
    assert gemm.blocked is not None and gemm.mkl_rows == 4
    for shape in [
        (1, in_features),
        (3, in_features),
        (2, 2, in_features),
        (9, in_features),
        (0, in_features),
    ]:
        x = torch.randn(shape, generator=g)
        expected = F.linear(x, weight, b)
        for got in (gemm(x, b), gemm.mkl(x, b), gemm.onednn(x, b)):
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_the_view_reads_the_packed_buffer_in_place():
    gemm = PackedGemm(torch.randn(128, 64), mkl_rows=1)
    assert gemm.blocked.data_ptr() == torch.ops.mkldnn.data_ptr(gemm.packed)


def test_a_padded_layout_keeps_every_call_on_onednn():
    weight = torch.randn(100, 64)  # 100 output rows: oneDNN pads the last block
    gemm = PackedGemm(weight, mkl_rows=8)
    assert gemm.blocked is None and gemm.mkl_rows == 0
    for rows in (1, 0):
        x = torch.randn(rows, 64)
        assert torch.allclose(gemm(x), F.linear(x, weight), rtol=1e-4, atol=1e-4)


def test_the_host_limit_is_a_probed_row_count_measured_once():
    limit = mkl_rows_limit(128, 64, torch.get_num_threads())
    assert limit in (0, *PROBE_ROWS)
    before = mkl_rows_limit.cache_info().hits
    assert mkl_rows_limit(128, 64, torch.get_num_threads()) == limit
    assert mkl_rows_limit.cache_info().hits == before + 1


@pytest.mark.parametrize("case", ["gpt-oss", "qwen-shared-gated", "plain-gelu-tanh"])
@pytest.mark.parametrize("limit", [0, 4])
def test_packed_block_on_either_library_computes_the_ops_kernel(case, limit, monkeypatch):
    """Blocks wide enough for the view, with every call of at most ``limit`` rows on MKL."""
    monkeypatch.setattr(packed_gemm, "mkl_rows_limit", lambda *shape: limit)
    shape = dataclasses.replace(CASES[case], hidden_size=64, expert_size=64)
    if shape.shared_expert_size:
        shape = dataclasses.replace(shape, shared_expert_size=128)
    weights = random_weights(case, seed=4, shape=shape)
    packed = PackedMoE(shape, weights)
    assert packed.down[0].blocked is not None and packed.down[0].mkl_rows == limit
    for tokens in (1, 3, 13):
        x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            out, chosen = packed(x)
            expected, expected_chosen = moe_eager(shape, weights, x)
        assert rel_l2(out, expected) <= 1e-6 and torch.equal(chosen, expected_chosen)
