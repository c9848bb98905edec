"""Quantised experts on the ``ort`` target: ``com.microsoft.QMoE`` on the packed codes where it
computes the dequantised block exactly, ``MoE`` on dequantised weights where it does not."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

import moec
from moec.compiler.lower_qmoe import qmoe_unsupported_reasons
from moec.ir import MoESpec

FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
TOLERANCE = 1e-5  # rel L2 against the dequantised block


@pytest.fixture(scope="module")
def block_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((16, 8, 32)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def lm_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (24, 32)))
    return path


def _compiled(source, out, calib, bits, block, symmetric) -> onnx.ModelProto:
    moec.compile(
        source,
        target="ort",
        output=out,
        calib=calib,
        quantize=bits,
        block_size=block,
        symmetric=symmetric,
    )
    report = moec.verify(out)
    assert report, report
    assert max(o.rel_l2 for o in report.outputs) <= TOLERANCE
    return onnx.load(out / "model.onnx", load_external_data=False)


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}


def _check_packed(model: onnx.ModelProto, bits: int) -> None:
    """QMoE's codes are uint8 initializers of [E, N, K * bits / 8], and no float initializer
    is as large as a stack of expert matrices (no float copy of the weights)."""
    inits = {i.name: i for i in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "QMoE"][:1]
    fc1, fc2 = inits[node.input[2]], inits[node.input[5]]
    assert fc1.data_type == fc2.data_type == onnx.TensorProto.UINT8
    experts, hidden, packed = fc2.dims
    assert fc1.dims[0] == experts and fc1.dims[2] == hidden * bits // 8
    stack = experts * hidden * packed * 8 // bits
    floats = [int(np.prod(i.dims)) for i in inits.values() if i.data_type in FLOATS]
    assert max(floats) < stack


@pytest.mark.parametrize(
    ("bits", "block", "symmetric"),
    [
        ("int4", 16, False),
        ("int4", 32, True),
        ("int4", 0, False),
        ("int8", 0, True),
        ("int8", 0, False),
    ],
)
def test_a_quantized_block_runs_in_qmoe(tmp_path, block_calibration, bits, block, symmetric):
    model = _compiled("zoo:mixtral", tmp_path / "a", block_calibration, bits, block, symmetric)
    assert _ops(model) == {"QMoE"}
    _check_packed(model, {"int4": 4, "int8": 8}[bits])


def test_a_quantized_lm_runs_in_qmoe(tmp_path, lm_calibration):
    model = _compiled("zoo:mixtral-lm", tmp_path / "a", lm_calibration, "int4", 16, False)
    assert _ops(model) == {"QMoE"}
    assert sum(n.op_type == "QMoE" for n in model.graph.node) == 2
    _check_packed(model, 4)


def test_qmoe_weights_that_are_not_renormalised(tmp_path, lm_calibration):
    """QMoE renormalises the top-k weights whatever normalize_routing_weights says, so a block
    that keeps its softmax scores (Qwen-MoE) is routed in standard ops and rescaled."""
    model = _compiled("zoo:qwen-moe-lm", tmp_path / "a", lm_calibration, "int4", 32, False)
    assert _ops(model) == {"QMoE"}


@pytest.mark.parametrize("symmetric", [True, False])
def test_blockwise_int8_falls_back_to_dequantised_moe(
    tmp_path, block_calibration, caplog, symmetric
):
    with caplog.at_level("WARNING"):
        model = _compiled("zoo:mixtral", tmp_path / "a", block_calibration, "int8", 32, symmetric)
    assert _ops(model) == {"MoE"}
    assert "not QMoE" in caplog.text and "blockwise int8" in caplog.text
    codes = [i for i in model.graph.initializer if len(i.dims) == 3 and i.data_type not in FLOATS]
    assert codes  # the artifact still stores the codes; DequantizeLinear runs on them


def test_qmoe_reasons():
    spec = MoESpec(
        num_experts=4,
        top_k=2,
        hidden_size=32,
        expert_size=64,
        expert_kind="gated",
        weight_bits=4,
        weight_block_size=None,
        weight_symmetric=True,
    )
    assert qmoe_unsupported_reasons(spec) == []
    odd = dataclasses.replace(spec, hidden_size=33)
    assert "hidden size 33 is odd" in qmoe_unsupported_reasons(odd)[0]
    blocked_int8 = dataclasses.replace(spec, weight_bits=8, weight_block_size=16)
    assert "blockwise int8" in qmoe_unsupported_reasons(blocked_int8)[0]
    assert qmoe_unsupported_reasons(dataclasses.replace(spec, weight_bits=8)) == []
