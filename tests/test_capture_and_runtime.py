"""Capture structure, the pass pipeline, the artifact's manifest, and the runner interface."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import moec
from moec.benchmark import BenchReport, BenchRow
from moec.cli import main
from moec.compiler.capture import capture
from moec.compiler.moe_block import MoEBlock
from moec.errors import MoecError
from moec.ir.program import moe_nodes
from moec.ir.signature import DynamicDim
from moec.models import build_zoo
from moec.placing import place


def test_capture_makes_one_node_per_block_and_restores_the_model():
    source = build_zoo("deepseek-lm")
    before = [type(m).__name__ for m in source.model.modules()]
    captured = capture(source)
    nodes = moe_nodes(captured.program)
    assert len(nodes) == len(captured.blocks) == 2
    assert [b.name for b in captured.blocks] == ["layers.0.moe", "layers.1.moe"]
    assert not any("topk" in str(n.target) for n in captured.program.graph.nodes)
    assert [type(m).__name__ for m in source.model.modules()] == before
    assert not any(isinstance(m, MoEBlock) for m in source.model.modules())
    (ids,) = captured.inputs
    assert ids.name == "input_ids" and ids.value_range == (0, 256)
    assert ids.shape == (DynamicDim("batch", 1, None), DynamicDim("sequence_length", 1, 64))
    assert [o.name for o in captured.outputs] == ["logits", "routing.0", "routing.1"]
    assert captured.outputs[1].role == "routing" and captured.outputs[1].block == "layers.0.moe"


def test_captured_program_runs_the_eager_kernel():
    source = build_zoo("gpt-oss", seq=5)
    captured = capture(source)
    (x,) = source.example_inputs
    out, routing = captured.program.module()(x)
    with torch.no_grad():
        torch.testing.assert_close(out, source.model(x))
    assert routing.shape == (2, 5, 8) and (routing.sum(-1) == 2).all()


def test_manifest_records_what_the_design_asks_for(zoo_artifact):
    result = zoo_artifact("qwen-moe-lm", "ort")
    data = json.loads((result.path / "manifest.json").read_text())
    assert data["format"] == "moec-artifact" and data["target"] == "ort"
    assert {"moec", "torch", "onnx", "onnxruntime"} <= set(data["versions"])
    assert data["source"]["spec"] == "zoo:qwen-moe-lm" and len(data["source"]["sha256"]) == 64
    assert "tolerances" not in data  # moec judges an artifact by its own tolerances
    assert data["settings"]["target"] == "ort"
    assert [p["name"] for p in data["passes"]] == ["grouped-gemm"]
    assert data["inputs"][0]["shape"][1] == {"name": "sequence_length", "min": 1, "max": 64}
    assert all(b["lowering"] in ("fused", "gather") for b in data["blocks"])
    assert all("top-4 softmax" in b["summary"] for b in data["blocks"])
    assert set(data["files"]) == {"model", "weights"}


def test_runner_keeps_the_callers_array_type(zoo_artifact):
    m = moec.load(zoo_artifact("mixtral-lm", "ort").path)
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    logits = m(ids)
    assert isinstance(logits, np.ndarray) and logits.shape == (1, 6, 256)
    as_torch = m(torch.from_numpy(ids))
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), logits)
    outputs = m.infer({"input_ids": ids})
    cache = {f"present.{i}.{kv}" for i in (0, 1) for kv in ("key", "value")}
    assert set(outputs) == {"logits", "routing.0", "routing.1"} | cache
    assert outputs["routing.0"].dtype == np.bool_ and m.inference_time > 0
    m.deactivate()
    assert not m.is_active


def test_cli_compile_run_verify_inspect(tmp_path):
    runner = CliRunner()
    out = tmp_path / "art"
    result = runner.invoke(main, ["compile", "zoo:switch-lm", "-t", "onnx", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "MoE blocks" in result.output and "gather" in result.output
    assert "2 MoE block(s)" in result.output
    np.savez(tmp_path / "in.npz", input_ids=np.ones((2, 5), np.int64))
    result = runner.invoke(
        main,
        ["run", str(out), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")],
    )
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "o.npz") as saved:
        assert saved["logits"].shape == (2, 5, 256)
    result = runner.invoke(main, ["verify", str(out), "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "routing vs eager" in result.output
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True
    result = runner.invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0 and "layers.1.moe" in result.output
    result = runner.invoke(main, ["inspect", "zoo:deepseek"])
    assert result.exit_code == 0 and "DeepSeekMoE" in result.output


def test_verify_fails_with_exit_1_when_out_of_tolerance(tmp_path, zoo_artifact):
    import shutil

    out = tmp_path / "art"
    shutil.copytree(zoo_artifact("mixtral", "ort").path, out)
    report = moec.verify(out, rel_l2=1e-12)  # no float32 lowering can meet this
    assert not report and report.routing[0].passed and not report.outputs[0].passed
    result = CliRunner().invoke(main, ["verify", str(out), "--rel-l2", "1e-12"])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_list_passes(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(main, ["compile", "--list-passes", "-t", "onnx"])
    assert result.exit_code == 0 and "grouped-gemm" in result.output
    passes = ("merge-experts", "prune-experts", "distill-dense", "quantize-experts")
    for name in (*passes, "select-lowering"):
        assert f"│ {name} " in result.output  # every pass, marked as running or not
    assert "(gather, counting, capacity, dense)" in result.output  # the target's lowerings
    result = CliRunner().invoke(main, ["compile", "--list-passes", "--capacity", "auto"])
    assert result.exit_code == 0 and "capacity" in result.output


def test_cli_bench(zoo_artifact, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # rows whole: a pipe's width fits the content
    art = str(zoo_artifact("mixtral", "ort").path)
    result = CliRunner().invoke(main, ["bench", art, "--repeat", "2", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    assert "provider: CPUExecutionProvider, artifact threads: " in result.output
    assert "speed-up" in result.output and result.output.count("│ batch=1 sequence_length=") == 3
    result = CliRunner().invoke(main, ["bench", art, "--repeat", "1", "--shapes", "3,5"])
    assert result.exit_code == 0, result.output
    assert result.output.count("│ batch=3 sequence_length=5 ") == 1


def test_bench_warns_when_its_rounds_disagree():
    steady = BenchRow({"batch": 1}, eager_ms=[2.0, 2.1, 1.9], artifact_ms=[1.0, 1.0, 1.0])
    noisy = BenchRow({"batch": 4}, eager_ms=[2.0, 9.0, 2.0], artifact_ms=[1.0, 1.0, 1.0])
    assert steady.speedup == 2.0 and not steady.unreliable and noisy.unreliable
    [warning] = BenchReport([steady, noisy]).warnings
    assert warning.startswith("batch=4: the rounds disagree (speed-up 2.00x to 9.00x)")


def test_verify_takes_inputs_shapes_and_elementwise_tolerances(tmp_path, zoo_artifact, monkeypatch):
    art = str(zoo_artifact("mixtral", "ort").path)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((3, 5, 32), np.float32))
    report = moec.verify(art, inputs=dict(np.load(tmp_path / "x.npz")), atol=1e-5, rtol=1e-4)
    assert report and report.dims == [{"batch": 3, "sequence_length": 5}]
    assert report.outputs[0].outside == 0
    assert "verified on the given inputs only" in report.notes[-1]
    runner = CliRunner()
    exact = runner.invoke(main, ["verify", art, "--inputs", str(tmp_path / "x.npz"), "--atol", "0"])
    assert exact.exit_code == 1 and "outside)" in exact.output  # float rounding is not 0
    monkeypatch.delenv("COLUMNS", raising=False)
    shaped = runner.invoke(main, ["verify", art, "--shapes", "1,1", "--shapes", "2,3"])
    assert shaped.exit_code == 0
    assert "(2 shapes: batch=1 sequence_length=1; batch=2" in shaped.output
    other = runner.invoke(main, ["verify", art, "--source", "zoo:qwen-moe"])
    assert other.exit_code == 2 and "the source zoo:qwen-moe is not the model" in other.output


@pytest.mark.parametrize("target", ["ort", "torch"])
def test_an_artifact_without_routing_outputs_runs_and_verifies_its_outputs(tmp_path, target):
    result = moec.compile("zoo:mixtral-lm", target=target, output=tmp_path / "out",
                          no_routing_outputs=True)  # fmt: skip
    names = [spec.name for spec in result.manifest.outputs]
    assert names[0] == "logits" and not any(name.startswith("routing") for name in names)
    with moec.load(result.path) as runner:
        assert set(runner.infer({"input_ids": np.zeros((1, 3), np.int64)})) == set(names)
    report = moec.verify(result.path)
    assert report and not report.routing and "no routing outputs" in report.notes[0]
    np.save(tmp_path / "calib.npy", np.zeros((8, 8), np.int64))
    if target == "torch":  # the target whose runtime places experts
        with pytest.raises(MoecError, match="no routing outputs to count expert load from"):
            place(result.path, devices=2, calib=tmp_path / "calib.npy")
