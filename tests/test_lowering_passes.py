"""Each pass over a captured program, run alone (the lossy passes over a `CompressionState`
are in test_compression.py), and the pass manager's checks: the IR after every pass, and a
pass's in-place promise."""

from __future__ import annotations

import dataclasses

import pytest

import moec
from moec import registry
from moec.compiler.capture import capture
from moec.errors import LoweringError, PassError
from moec.ir.program import CapturedProgram, node_spec, set_node_spec
from moec.models import build_zoo
from moec.passes import CapacityPass, GroupedGemmPass, PassManager, PassResult, SelectLoweringPass
from moec.passes.grouped_gemm import default_lowering
from moec.passes.pass_base import Pass
from moec.runtime.inputs import make_inputs


@pytest.fixture
def program() -> CapturedProgram:
    """zoo:deepseek-lm captured: two DeepSeek-like blocks (sigmoid, groups, shared expert)."""
    return capture(build_zoo("deepseek-lm"))


def lowerings(program: CapturedProgram) -> list[str | None]:
    return [node_spec(n).lowering for n in program.moe_nodes()]


def test_capture_leaves_blocks_unlowered_and_consistent(program):
    assert lowerings(program) == [None, None]
    assert program.problems() == []


def test_select_lowering_gives_every_block_the_lowering(program):
    result = SelectLoweringPass("gather")(program)
    assert result.program is program and result.modified
    assert lowerings(program) == ["gather", "gather"]
    assert [r.reason for r in program.block_records()] == ["asked for with --lowering"] * 2
    assert result.report == {
        "blocks": [
            {"block": "layers.0.moe", "lowering": "gather"},
            {"block": "layers.1.moe", "lowering": "gather"},
        ]
    }


def test_select_lowering_refuses_a_block_it_cannot_compute():
    program = capture(build_zoo("expert-choice"))
    with pytest.raises(LoweringError, match=r"cannot compute MoE block .*expert-choice routing"):
        SelectLoweringPass("fused")(program)


@pytest.mark.parametrize(("target", "expected"), [("ort", "fused"), ("onnx", "gather")])
def test_grouped_gemm_follows_the_default_rule(program, target, expected):
    result = GroupedGemmPass(target)(program)
    assert lowerings(program) == [expected, expected]
    assert result.report["autotune"] is False
    spec = node_spec(program.moe_nodes()[0]).with_lowering(None)
    assert default_lowering(registry.target(target), spec)[0] == expected


def test_the_default_rule_steps_past_what_a_block_cannot_take_and_says_why():
    ort = registry.target("ort")
    spec = node_spec(capture(build_zoo("deepseek-lm")).moe_nodes()[0]).with_lowering(None)
    big = dataclasses.replace(spec, hidden_size=1024, expert_size=512, shared_expert_size=0)
    lowering, why = default_lowering(ort, big)
    limit = next(step.max_expert_elements for step in ort.default if step.max_expert_elements)
    assert lowering == "gather"
    assert f"not fused: hidden x expert size {1024 * 512} > {limit}" in why
    quantized = dataclasses.replace(big, weight_bits=4, weight_block_size=32)
    assert default_lowering(ort, quantized) == (
        "fused",
        "ORT's QMoE runs quantised experts on their codes",
    )
    choice = dataclasses.replace(
        spec, routing="expert_choice", score="softmax", n_group=1, topk_group=1
    )
    lowering, why = default_lowering(ort, choice)
    assert lowering == "gather" and "not fused: expert-choice routing" in why


def test_capacity_pass_sizes_slots_from_calibration(program):
    calibration = make_inputs(program.inputs, ((1, 16), (2, 32)), seed=1)
    result = CapacityPass("onnx", "auto", calibration)(program)
    assert lowerings(program) == ["capacity", "capacity"]
    factors = [node_spec(n).lowering_capacity_factor for n in program.moe_nodes()]
    assert all(f > 1 for f in factors)  # auto: the peak load over an even spread, plus a margin
    assert result.report["calibration_calls"] == 2
    assert result.report["drop_rate"] == 0.0  # sized to the peak load it measured


def test_capacity_pass_keeps_an_exact_lowering_where_it_cannot_apply():
    program = capture(build_zoo("expert-choice"))
    calibration = make_inputs(program.inputs, ((1, 8),), seed=1)
    CapacityPass("ort", 2.0, calibration)(program)
    (record,) = program.block_records()
    assert record.lowering == registry.target("ort").fallback
    assert record.reason.startswith("no capacity: expert-choice routing")


class BreakSpec(Pass[CapturedProgram]):
    """Gives the first block a spec whose hidden size its weights do not have."""

    name = "break-spec"
    description = "a broken pass"

    def call(self, program):
        node = program.moe_nodes()[0]
        set_node_spec(node, dataclasses.replace(node_spec(node), hidden_size=3))
        return PassResult(program, True)


class SaysNewButReturnsItsInput(Pass[CapturedProgram]):
    name = "not-a-copy"
    description = "returns its input"
    in_place = False

    def call(self, program):
        return PassResult(program, False)


class CopiesButSaysInPlace(Pass[CapturedProgram]):
    name = "copies"
    description = "returns a different program"

    def call(self, program):
        return PassResult(dataclasses.replace(program), True)


def test_the_pass_manager_names_the_pass_that_broke_the_ir(program):
    manager = PassManager([SelectLoweringPass("gather"), BreakSpec()])
    with pytest.raises(PassError, match="pass break-spec left the program inconsistent: "):
        manager.run(program)
    expected = "node moe: w_up has shape (16, 32, 32), the spec implies (16, 32, 3)"
    assert any(expected in problem for problem in program.problems())


def test_a_pass_is_held_to_its_in_place_promise(program):
    with pytest.raises(PassError, match="copies is declared in place"):
        PassManager([CopiesButSaysInPlace()]).run(program)
    with pytest.raises(PassError, match="not-a-copy is declared not in place"):
        PassManager([SaysNewButReturnsItsInput()]).run(program)


def test_the_pipeline_refuses_a_lowering_its_target_cannot_run(tmp_path):
    with pytest.raises(LoweringError, match="has lowering gather, which target torch cannot run"):
        moec.compile(
            "zoo:mixtral",
            target="torch",
            passes=[SelectLoweringPass("gather")],
            output=tmp_path / "x",
        )
    result = moec.compile("zoo:mixtral", target="torch", passes=[], output=tmp_path / "a")
    assert result.blocks[0].lowering == "kernel"  # no pass chose: the exact fallback


def test_the_ir_check_sees_an_impossible_lowering():
    program = capture(build_zoo("expert-choice"))
    node = program.moe_nodes()[0]
    set_node_spec(node, node_spec(node).with_lowering("fused"))
    problems = program.problems()
    assert problems and all(p.startswith("node moe: lowering fused: ") for p in problems)
    assert "expert-choice routing gives each token a variable number" in problems[0]
