"""Every lowering of every zoo block and zoo LM, and of every routing family, verified against
eager PyTorch on several shapes (batch 1 and seq 1 included)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from lowering_checks import DROPLESS, assert_verified, compile_with_lowering
from moe_cases import CASES, H, random_weights

import moec
from moec import registry
from moec.compiler import lower_moe_gather
from moec.compiler.moe_block import MoEBlock
from moec.compiler.onnx_ops import register_ort_schemas
from moec.errors import LoweringError
from moec.models import build_zoo, find_moe_blocks, zoo_names

# (target, lowering, capacity factor); lowering None is the target's default pipeline
COMBOS = [
    ("ort", None, None),
    ("ort", "fused", None),
    ("ort", "gather", None),
    ("ort", "dense", None),
    ("onnx", None, None),
    ("onnx", "dense", None),
    ("onnx", "capacity", DROPLESS),
    ("torch", None, None),
    ("torch", "kernel", None),
    ("torch", "grouped_mm", None),
]


def compile_zoo(name, target, lowering, capacity, out):
    return moec.compile(
        f"zoo:{name}", target=target, lowering=lowering, capacity=capacity, output=out
    )


@pytest.mark.parametrize(("target", "lowering", "capacity"), COMBOS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", zoo_names())
def test_every_lowering_of_every_zoo_model(tmp_path, name, target, lowering, capacity):
    spec = find_moe_blocks(build_zoo(name).model)[0].spec
    why_not = registry.lowering(lowering).unsupported_reasons(spec) if lowering else []
    if why_not and lowering == "capacity":  # the capacity pass keeps such blocks exact
        result = compile_zoo(name, target, lowering, capacity, tmp_path / "a")
        assert {b.lowering for b in result.blocks} == {"gather"}
        assert all("no capacity" in b.reason for b in result.blocks)
        return
    if why_not:
        with pytest.raises(LoweringError, match="cannot compute MoE block"):
            compile_zoo(name, target, lowering, capacity, tmp_path / "a")
        return
    result = compile_zoo(name, target, lowering, capacity, tmp_path / "a")
    if lowering:
        assert {b.lowering for b in result.blocks} == {lowering}
    assert_verified(moec.verify(result.path), blocks=len(result.blocks))
    if target == "torch":
        assert (result.path / "model.pt2").is_file()
        return
    register_ort_schemas()
    model = onnx.load(str(result.path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    fused = sum(b.lowering == "fused" for b in result.blocks)
    assert sum(n.op_type == "MoE" for n in model.graph.node) == fused
    if target == "onnx":
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}


@pytest.mark.parametrize("lowering", registry.lowering_names())
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_routing_family_lowers_exactly(tmp_path, case, lowering):
    spec, weights = CASES[case], random_weights(case, seed=1)
    block = MoEBlock(spec, weights)
    result = compile_with_lowering(block, (torch.randn(2, 8, H),), spec, lowering, tmp_path / "a")
    if result is None:
        return
    exact = lowering if not registry.lowering(lowering).unsupported_reasons(spec) else "gather"
    assert result.blocks[0].lowering == exact
    assert_verified(moec.verify(result.path, source=block), blocks=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gather_with_the_activation_over_all_experts_at_once_is_exact(tmp_path, monkeypatch, case):
    """Blocks of more than PER_EXPERT_ACTIVATION_MAX experts concatenate the experts' first
    projections and run the activation once; the cases are smaller, so lower the threshold."""
    block = MoEBlock(CASES[case], random_weights(case, seed=2))

    def compile_nodes(name):
        args = dict(target="onnx", lowering="gather", output=tmp_path / name)
        result = moec.compile(block, (torch.randn(2, 8, H),), **args)
        return result, len(onnx.load(str(result.path / "model.onnx")).graph.node)

    _, per_expert_nodes = compile_nodes("per-expert")
    monkeypatch.setattr(lower_moe_gather, "PER_EXPERT_ACTIVATION_MAX", 0)
    result, nodes = compile_nodes("at-once")
    assert nodes < per_expert_nodes
    assert_verified(moec.verify(result.path, source=block), blocks=1)


def test_capacity_without_overflow_is_bit_for_bit_dropless(tmp_path):
    source = build_zoo("mixtral-lm")
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, (2, 16))}
    arts = {
        factor: moec.compile(
            "zoo:mixtral-lm",
            target="onnx",
            capacity=factor,
            calibration=[feeds],
            output=tmp_path / str(factor),
        )
        for factor in ("auto", DROPLESS)
    }
    report = arts["auto"].manifest.passes[0]["report"]
    assert report["drop_rate"] == 0.0
    outs = {f: moec.load(a.path)(feeds["input_ids"]) for f, a in arts.items()}
    assert np.array_equal(outs["auto"], outs[DROPLESS])
    with torch.no_grad():
        ref = source.model(torch.from_numpy(feeds["input_ids"])).numpy()
    assert np.linalg.norm(outs["auto"] - ref) / np.linalg.norm(ref) < 1e-5


def test_reported_drop_rate_equals_a_direct_count(tmp_path):
    """The first block's inputs do not depend on any drop, so what the artifact actually
    served there can be counted against what the model routed, pair by pair."""
    feeds = [{"input_ids": np.random.default_rng(i).integers(0, 256, (2, 24))} for i in range(3)]
    art = moec.compile(
        "zoo:mixtral-lm", target="onnx", capacity=0.75, calibration=feeds, output=tmp_path / "a"
    )
    first = art.manifest.passes[0]["report"]["blocks"][0]
    reference = moec.compile("zoo:mixtral-lm", target="torch", output=tmp_path / "ref")
    dropped = routed = 0
    with moec.load(art.path) as runner, moec.load(reference.path) as dropless:
        for feed in feeds:
            served, wanted = runner.infer(feed)["routing.0"], dropless.infer(feed)["routing.0"]
            assert not (served & ~wanted).any()  # nothing served that was not routed
            routed += int(wanted.sum())
            dropped += int((wanted & ~served).sum())
    assert dropped > 0
    assert (first["dropped_pairs"], first["routed_pairs"]) == (dropped, routed)
    assert first["drop_rate"] == dropped / routed


def test_why_a_block_was_not_fused_is_recorded(tmp_path):
    result = moec.compile("zoo:expert-choice", target="ort", output=tmp_path / "a")
    (block,) = result.manifest.blocks
    assert block["lowering"] == "gather"
    assert "variable number of experts" in block["reason"]


@pytest.mark.parametrize(
    ("target", "lowering", "message"),
    [
        ("onnx", "fused", "on target onnx; it can run: gather, counting, capacity, dense"),
        ("torch", "gather", "it can run: kernel"),
    ],
)
def test_lowering_the_target_cannot_run_is_refused(tmp_path, target, lowering, message):
    with pytest.raises(LoweringError) as info:
        moec.compile("zoo:mixtral", target=target, lowering=lowering, output=tmp_path / "a")
    assert message in str(info.value)


def test_gather_is_exact_on_many_tokens(tmp_path):
    """Regression: ORT's multi-threaded ScatterND(add) races on repeated indices; the gather
    lowering must not depend on it (every token appears in k experts' outputs)."""
    source = build_zoo("mixtral")
    art = moec.compile("zoo:mixtral", target="onnx", lowering="gather", output=tmp_path / "a")
    x = np.random.default_rng(0).standard_normal((1, 4096, 32)).astype(np.float32)
    with torch.no_grad():
        ref = source.model(torch.from_numpy(x)).numpy()
    runner = moec.load(art.path, intra_op_threads=2)
    for _ in range(3):
        out = runner(x)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_gather_sorts_the_pairs_of_top_k_routing(tmp_path):
    """Top-k blocks take the sorted-pairs path (no NonZero, no position CumSums); a block with
    capacity, whose tokens may keep fewer than k pairs, takes the routing-mask path."""
    ops = {}
    for name in ("mixtral", "switch"):
        art = moec.compile(f"zoo:{name}", target="onnx", lowering="gather", output=tmp_path / name)
        ops[name] = {n.op_type for n in onnx.load(str(art.path / "model.onnx")).graph.node}
    assert "NonZero" not in ops["mixtral"] and "CumSum" not in ops["mixtral"]
    assert "NonZero" in ops["switch"]
