"""Every zoo block and LM, and every routing family, lowered for `ort` and `onnx` and verified
against eager PyTorch on several shapes (batch 1 and seq 1 included)."""

from __future__ import annotations

import onnx
import pytest
import torch
from moe_cases import CASES, H, random_weights

import moec
from moec.compiler.lower_moe_fused import fused_unsupported_reasons
from moec.compiler.moe_block import MoEBlock
from moec.compiler.onnx_ops import register_ort_schemas
from moec.models import zoo_names

TARGETS = ("ort", "onnx")
# zoo blocks whose configuration com.microsoft.MoE cannot express exactly
NOT_FUSED = {"expert-choice"}


def assert_verified(report, blocks: int):
    assert report, report.to_dict()
    shapes = [tuple(next(iter(s.values()))) for s in report.shapes]
    assert len(shapes) >= 3 and any(s[0] == 1 for s in shapes) and any(s[1] == 1 for s in shapes)
    assert all(o.rel_l2 <= 1e-5 for o in report.outputs)
    assert len(report.routing) == blocks
    assert all(r.agreement >= 0.999 and r.tokens > 0 for r in report.routing)


def load_onnx(path):
    register_ort_schemas()
    return onnx.load(str(path / "model.onnx"))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", zoo_names())
def test_zoo_model_compiles_and_verifies(zoo_artifact, name, target):
    result = zoo_artifact(name, target)
    report = moec.verify(result.path)
    assert_verified(report, blocks=len(result.blocks))

    model = load_onnx(result.path)
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node}
    fused_nodes = sum(n.op_type == "MoE" for n in model.graph.node)
    if target == "onnx" or name.removesuffix("-lm") in NOT_FUSED:
        assert {b.lowering for b in result.blocks} == {"dense"}
        assert fused_nodes == 0
    else:
        assert {b.lowering for b in result.blocks} == {"fused"}
        assert fused_nodes == len(result.blocks)
    if target == "onnx":
        assert domains <= {"", "ai.onnx"}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_routing_family_lowers_exactly(tmp_path, case, target):
    spec, weights = CASES[case], random_weights(case, seed=1)
    block = MoEBlock(spec, weights)
    result = moec.compile(block, (torch.randn(2, 8, H),), target=target, output=tmp_path / "a")
    fused = target == "ort" and not fused_unsupported_reasons(spec)
    assert result.blocks[0].lowering == ("fused" if fused else "dense")
    assert_verified(moec.verify(result.path, source=block), blocks=1)


def test_why_a_block_was_not_fused_is_recorded(zoo_artifact):
    result = zoo_artifact("expert-choice", "ort")
    (block,) = result.manifest.blocks
    assert block["lowering"] == "dense"
    assert "variable number of experts" in block["reason"]
