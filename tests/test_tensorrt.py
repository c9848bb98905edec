"""The trt target: the TensorRT check (no TensorRT needed), the counting lowering, profiles,
the engine-less artifact, build-engine and the runner's checks before TensorRT is imported.

TensorRT cannot be installed here: what needs it (building and running an engine) is covered
by bench/gpu_check.py on a GPU machine, and the tests that would need it skip with the reason.
A stand-in ``tensorrt`` module is used only to reach the runner's version and GPU checks.
"""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

import moec
from moec.cli import main
from moec.compiler.onnx_ops import _integer_ratio
from moec.compiler.trt_check import MAX_TOPK, check_trt, op_table
from moec.compiler.trt_profiles import input_shapes, profile_dims
from moec.errors import (
    ArtifactError,
    LoweringError,
    RuntimeUnavailableError,
    SettingsError,
    UsageError,
)
from moec.ir.signature import DynamicDim, TensorSpec
from moec.runtime.manifest import Manifest
from moec.runtime.tensorrt_env import tensorrt_missing
from moec.settings import CompileSettings

NO_TENSORRT = tensorrt_missing()


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trt_lm(tmp_path_factory):
    """zoo:mixtral-lm compiled for trt (without an engine, unless this machine has TensorRT)."""
    return moec.compile("zoo:mixtral-lm", target="trt", output=tmp_path_factory.mktemp("t") / "o")


# -- the checker -------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _value(name, elem=TensorProto.FLOAT, shape=("n",)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _reasons(model, **kwargs) -> list[str]:
    return [p.reason for p in check_trt(model, **kwargs)]


def test_the_op_table_names_its_source_and_version():
    table = op_table()
    assert table.tensorrt.startswith("10.") and "onnx-tensorrt" in table.source
    assert table.ops["TopK"]["supported"] and not table.ops["Unique"]["supported"]
    assert "reduction" in table.ops["ScatterND"]["restriction"]


@pytest.mark.parametrize(
    ("nodes", "inputs", "initializers", "expected"),
    [
        ([helper.make_node("Unique", ["x"], ["y"])], [_value("x")], [], "does not support Unique"),
        (
            [helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0)],
            [_value("x")],
            [helper.make_tensor("k", TensorProto.INT64, [1], [2])],
            "sorted=1",
        ),
        (
            [helper.make_node("TopK", ["x", "k"], ["y", "i"])],
            [_value("x")],
            [helper.make_tensor("k", TensorProto.INT64, [1], [MAX_TOPK])],
            f"k = {MAX_TOPK}",
        ),
        (
            [helper.make_node("TopK", ["x", "k"], ["y", "i"])],
            [_value("x"), _value("k", TensorProto.INT64, (1,))],
            [],
            "nothing bounds it",
        ),
        (
            [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="add")],
            [_value("x"), _value("i", TensorProto.INT64, ("n", 1)), _value("u")],
            [],
            "reduction=add",
        ),
        (
            [helper.make_node("CumSum", ["x", "a"], ["y"])],
            [_value("x"), _value("a", TensorProto.INT64, ())],
            [],
            "axis is computed at run time",
        ),
        (
            [helper.make_node("ReduceSum", ["x", "a"], ["y"])],
            [_value("x"), _value("a", TensorProto.INT64, (1,))],
            [],
            "axes is computed at run time",
        ),
        (
            [helper.make_node("Mul", ["x", "x"], ["y"])],
            [_value("x", TensorProto.DOUBLE)],
            [],
            "is double",
        ),
        (
            [helper.make_node("MatMul", ["x", "x"], ["y"])],
            [_value("x", TensorProto.INT64, ("n", "n"))],
            [],
            "is int64",
        ),
        (
            [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
            [_value("q", TensorProto.INT8)],
            [
                helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]),
                helper.make_tensor("z", TensorProto.INT8, [], [3]),
            ],
            "zero point",
        ),
        (
            [helper.make_node("MoE", ["x"], ["y"], domain="com.microsoft")],
            [_value("x")],
            [],
            "'com.microsoft' is not standard ONNX",
        ),
    ],
)
def test_the_checker_names_what_tensorrt_refuses(nodes, inputs, initializers, expected):
    model = _model(nodes, inputs, [_value(nodes[0].output[0])], initializers)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    reasons = _reasons(model)
    assert any(expected in r for r in reasons), reasons


def test_a_computed_topk_k_is_bounded_by_the_profile_of_the_axis_it_sorts():
    nodes = [helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1)]
    model = _model(
        nodes,
        [_value("x", shape=("batch", "sequence_length")), _value("k", TensorProto.INT64, (1,))],
        [_value("y", shape=("batch", None))],
    )
    assert _reasons(model, dim_max={"sequence_length": 512}) == []
    (reason,) = _reasons(model, dim_max={"sequence_length": 4096})
    assert "may reach 4096" in reason and "lower the profile" in reason


def test_subgraphs_are_checked_and_if_branches_of_different_rank_refused():
    then = helper.make_graph([helper.make_node("Unique", ["x"], ["u"])], "then", [], [_value("u")])
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["v"])], "else", [], [_value("v", shape=("a", "b"))]
    )
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = _model(nodes, [_value("c", TensorProto.BOOL, ()), _value("x")], [_value("y")])
    reasons = _reasons(model)
    assert any("differ in rank" in r for r in reasons)
    assert any("Unique" in r for r in reasons)


def test_an_opset_outside_the_table_is_refused():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x")], [_value("y")], opset=8)
    assert any("opset 8" in r for r in _reasons(model))


def test_an_ort_artifact_fails_check_trt_naming_its_contrib_nodes(zoo_artifact):
    result = zoo_artifact("mixtral-lm", "ort")
    out = run_cli("check-trt", result.path)
    assert out.exit_code == 1, out.output
    text = " ".join(out.output.split())
    assert "com.microsoft" in text and "MoE block layers.0.moe" in text and "node_MoE" in text


def test_a_trt_artifact_and_its_onnx_file_pass_check_trt(trt_lm):
    for path in (trt_lm.path, trt_lm.path / "model.onnx"):
        out = run_cli("check-trt", path)
        assert out.exit_code == 0, out.output
        assert "TensorRT 10." in out.output and "takes all" in out.output


def test_check_trt_refuses_what_holds_no_onnx(tmp_path, zoo_artifact):
    out = run_cli("check-trt", zoo_artifact("mixtral", "torch").path)
    assert out.exit_code == 2 and "holds no ONNX" in out.output
    out = run_cli("check-trt", tmp_path / "nothing")
    assert out.exit_code == 2 and "neither an artifact directory nor a .onnx file" in out.output
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    out = run_cli("check-trt", tmp_path / "bad.onnx")
    assert out.exit_code == 2 and "not a readable ONNX model" in out.output


class _InDouble(torch.nn.Module):
    def forward(self, x):
        return (x.double() * 3.0).float()


def test_compile_for_trt_refuses_a_graph_tensorrt_would_not_take(tmp_path):
    with pytest.raises(LoweringError, match=r"\(Mul\) in \(model\): input '\w+' is double"):
        moec.compile(_InDouble(), (torch.ones(2, 3),), target="trt", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_the_capacity_lowering_passes_for_trt_with_its_slots_in_integers(tmp_path):
    result = moec.compile("zoo:mixtral", target="trt", capacity=4.0, output=tmp_path / "o")
    ops = {n.op_type for n in onnx.load(result.path / "model.onnx").graph.node}
    assert "Ceil" not in ops and {b.lowering for b in result.blocks} == {"capacity"}
    assert moec.verify(result.path)


# -- the lowering ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixtral", "deepseek", "switch", "expert-choice", "gpt-oss"])
def test_every_zoo_block_compiles_for_trt_and_its_onnx_verifies(tmp_path, name):
    result = moec.compile(f"zoo:{name}", target="trt", output=tmp_path / "o")
    report = moec.verify(result.path)  # batch 1 and sequence 1 among its shapes
    assert report, report.summary()
    assert any("no engine was verified" in n for n in report.notes) == bool(NO_TENSORRT)
    assert check_trt(result.path / "model.onnx", [b.name for b in result.blocks],
                     {"batch": 8, "sequence_length": 64}) == []  # fmt: skip


@pytest.mark.parametrize("factor", [1.0, 1.25, 1.1, 2 / 3, 0.3, 1.5, 7.0])
@pytest.mark.parametrize(("times", "over"), [(1, 8), (2, 64), (6, 160)])
def test_integer_capacity_agrees_with_python_or_is_not_used(factor, times, over):
    ratio = _integer_ratio(factor, times, over)
    counts = np.arange(0, 1 << 20, 997)
    python = [math.ceil(factor * int(n) * times / over) for n in counts]
    if ratio is not None:
        ours = (ratio.numerator * counts + ratio.denominator - 1) // ratio.denominator
        assert ours.tolist() == python


# -- profiles and settings ---------------------------------------------------------------------
def _inputs():
    batch = DynamicDim("batch")
    seq, past = DynamicDim("sequence_length", 1, 64), DynamicDim("past_sequence_length", 0, 63)
    total = DynamicDim("total_sequence_length", 1, 64, sum_of=(past.name, seq.name))
    return [
        TensorSpec("input_ids", "int64", (batch, seq)),
        TensorSpec("attention_mask", "int64", (batch, total)),
        TensorSpec("past", "float32", (batch, 4, past, 8)),
    ]


def test_profiles_come_from_the_dims_ranges():
    dims = profile_dims(_inputs())
    assert dims == {
        "batch": [1, 1, 8],
        "sequence_length": [1, 64, 64],
        "total_sequence_length": [1, 64, 64],
        "past_sequence_length": [0, 63, 63],
    }
    dims = profile_dims(
        _inputs(), {"sequence_length": [1, 16, 32], "past_sequence_length": [0, 8, 16]}
    )
    assert dims["total_sequence_length"] == [1, 24, 48]  # the sum of its parts
    shapes = input_shapes(_inputs(), dims)
    assert shapes["past"] == [[1, 4, 0, 8], [1, 4, 8, 8], [8, 4, 16, 8]]
    long = [
        TensorSpec("ids", "int64", (DynamicDim("batch"), DynamicDim("sequence_length", 1, 32768)))
    ]
    assert profile_dims(long) == {"batch": [1, 1, 8], "sequence_length": [1, 128, 2048]}


def test_bad_trt_shapes_are_refused_naming_the_fix():
    with pytest.raises(SettingsError, match=r"no dynamic dim 'seq'.*batch"):
        profile_dims(_inputs(), {"seq": [1, 2, 3]})
    with pytest.raises(SettingsError, match=r"takes sequence_length in \[1, 64\]"):
        profile_dims(_inputs(), {"sequence_length": [1, 2, 128]})
    for bad, why in (
        ("batch:4,2,8", "MIN <= OPT <= MAX"),
        ("batch:1,2", "NAME:MIN,OPT,MAX"),
        ("batch=1,2,3", "NAME:MIN,OPT,MAX"),
    ):
        with pytest.raises(SettingsError, match=why):
            CompileSettings.from_flags({"target": "trt", "trt_shapes": [bad]})
    with pytest.raises(SettingsError, match="names batch twice"):
        CompileSettings.from_flags({"target": "trt", "trt_shapes": ["batch:1,1,2", "batch:1,2,4"]})
    with pytest.raises(SettingsError, match="target ort builds no engine"):
        CompileSettings.from_flags({"target": "ort", "trt_shapes": ["batch:1,1,2"]})


def test_precision_is_the_trt_targets_dtype():
    assert CompileSettings.from_flags({"target": "trt", "precision": "fp16"}).dtype == "fp16"
    with pytest.raises(SettingsError, match="target ort takes --dtype fp16"):
        CompileSettings.from_flags({"target": "ort", "precision": "fp16"})
    with pytest.raises(SettingsError, match="disagree"):
        CompileSettings.from_flags({"target": "trt", "precision": "fp16", "dtype": "bf16"})
    out = run_cli("compile", "zoo:mixtral", "-t", "ort", "--precision", "fp16", "-o", "x")
    assert out.exit_code == 2 and "takes --dtype fp16 instead" in out.output


def test_trt_shapes_from_the_cli_reach_the_manifest(tmp_path):
    out = run_cli(
        "compile", "zoo:mixtral-lm", "-t", "trt", "-o", tmp_path / "o",
        "--trt-shapes", "batch:1,2,4", "--trt-shapes", "sequence_length:1,8,16",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    build = Manifest.read(tmp_path / "o").build
    assert build["dims"]["batch"] == [1, 2, 4] and build["dims"]["sequence_length"] == [1, 8, 16]
    assert build["inputs"]["input_ids"] == [[1, 1], [2, 8], [4, 16]]
    out = run_cli(
        "compile", "zoo:mixtral-lm", "-t", "trt", "-o", tmp_path / "p", "--trt-shapes", "seq:1,2,3"
    )
    assert out.exit_code == 2 and "no dynamic dim 'seq'" in out.output
    assert not (tmp_path / "p").exists()


# -- the engine-less artifact ------------------------------------------------------------------
@pytest.mark.skipif(NO_TENSORRT is None, reason="this machine has TensorRT: the engine is built")
def test_without_tensorrt_the_artifact_is_complete_and_says_how_to_finish(trt_lm, tmp_path):
    manifest = trt_lm.manifest
    assert set(manifest.files) == {"model", "weights"} and "engine" not in manifest.build
    assert manifest.build["precision"] == "fp32" and manifest.build["inputs"]["input_ids"]
    assert "TensorRT 10." in manifest.build["checked_against"]
    (note,) = [n for n in manifest.notes if "build-engine" in n]
    assert f"moec build-engine {trt_lm.path}" in note and "TensorRT is not installed" in note
    with pytest.raises(RuntimeUnavailableError, match=f"moec build-engine {trt_lm.path}"):
        moec.load(trt_lm.path)
    out = run_cli("inspect", trt_lm.path)
    assert f"engine: not built yet; on the deployment machine: moec build-engine {trt_lm.path}" in (
        " ".join(out.output.split())
    )
    np.savez(tmp_path / "x.npz", input_ids=np.zeros((1, 3), np.int64))
    out = run_cli("run", trt_lm.path, "--input", tmp_path / "x.npz")
    assert out.exit_code == 2 and "build-engine" in out.output


@pytest.mark.skipif(NO_TENSORRT is None, reason="this machine has TensorRT: the engine is built")
def test_verify_runs_the_onnx_of_an_engine_less_artifact(trt_lm):
    out = run_cli("verify", trt_lm.path)
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "PASS" in text and "ran on ONNX Runtime instead" in text


def test_reduced_precision_keeps_the_routing_in_float32(tmp_path):
    for precision in ("fp16", "bf16"):
        out = tmp_path / precision
        moec.compile("zoo:mixtral-lm", target="trt", precision=precision, output=out)
        model = onnx.shape_inference.infer_shapes(onnx.load(out / "model.onnx"))
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        routing = [
            n for n in model.graph.node
            if n.op_type == "Softmax" and any("moe" in p.value for p in n.metadata_props
                                              if p.key == "pkg.torch.onnx.name_scopes")
        ]  # fmt: skip
        assert routing and all(types[n.input[0]] == TensorProto.FLOAT for n in routing)
        assert Manifest.read(out).build["precision"] == precision
    if NO_TENSORRT is not None:
        with pytest.raises(UsageError, match=r"bfloat16.*only where its engine runs"):
            moec.verify(tmp_path / "bf16")
    assert moec.verify(tmp_path / "fp16")  # fp16 ONNX runs on ONNX Runtime


def test_build_engine_refuses_what_it_cannot_build(trt_lm, zoo_artifact):
    out = run_cli("build-engine", zoo_artifact("mixtral", "ort").path)
    assert out.exit_code == 2 and "compile it with --target trt" in out.output
    if NO_TENSORRT is not None:
        out = run_cli("build-engine", trt_lm.path)
        assert out.exit_code == 2 and "needs TensorRT and a GPU here" in out.output
        assert "engine" not in Manifest.read(trt_lm.path).files  # nothing changed


# -- the runner's checks, before TensorRT runs -------------------------------------------------
class _StandInTensorRT(types.ModuleType):
    """Just enough of a ``tensorrt`` module to reach the runner's checks; no engine runs."""

    __version__ = "10.15.1.29"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return None  # what TensorRT returns for a plan it cannot read


@pytest.fixture
def engine_artifact(tmp_path, trt_lm, monkeypatch):
    """A copy of the trt artifact with an engine file listed as built for an H100 with
    TensorRT 10.15.1.29, on a machine that (by stand-ins) has that TensorRT and GPU."""
    import shutil

    import torch

    from moec.runtime.manifest import FileEntry, file_sha256

    out = tmp_path / "engine"
    shutil.copytree(trt_lm.path, out)
    (out / "model.plan").write_bytes(b"not an engine")
    data = json.loads((out / "manifest.json").read_text())
    data["files"]["engine"] = {"path": "model.plan", "bytes": 13,
                               "sha256": file_sha256(out / "model.plan")}  # fmt: skip
    data["build"]["engine"] = {"tensorrt": "10.15.1.29", "compute_capability": "9.0", "gpu": "H100"}
    (out / "manifest.json").write_text(json.dumps(data))
    assert FileEntry
    monkeypatch.setitem(sys.modules, "tensorrt", _StandInTensorRT("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "H100")
    monkeypatch.setattr(torch.cuda, "device", lambda device: _Nothing())
    return out


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_engine_for_another_gpu_or_tensorrt_names_build_engine(engine_artifact, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(
        RuntimeUnavailableError,
        match=r"compute capability 9\.0 \(this machine: 8\.0\).*moec build-engine",
    ):
        moec.load(engine_artifact)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_StandInTensorRT, "__version__", "10.16.0.72")
    with pytest.raises(
        RuntimeUnavailableError, match=r"TensorRT 10\.15\.1\.29 \(this machine: 10\.16\.0\.72\)"
    ):
        moec.load(engine_artifact)


def test_a_corrupt_engine_is_an_artifact_error_naming_build_engine(engine_artifact):
    with pytest.raises(ArtifactError, match=r"corrupt, or from another TensorRT.*build-engine"):
        moec.load(engine_artifact)


def test_an_edited_engine_file_is_caught_by_its_hash(engine_artifact):
    (engine_artifact / "model.plan").write_bytes(b"not an engin3")
    with pytest.raises(ArtifactError, match=r"does not match manifest\.json"):
        moec.load(engine_artifact)


@pytest.mark.skipif(NO_TENSORRT is not None, reason=f"needs TensorRT and a GPU: {NO_TENSORRT}")
def test_an_engine_built_here_verifies(tmp_path):  # runs only where TensorRT is
    result = moec.compile("zoo:mixtral-lm", target="trt", output=tmp_path / "o")
    assert "engine" in result.manifest.files
    assert moec.verify(result.path)


def test_the_tensorrt_rewrites_compute_what_the_graph_did():
    import onnx_ir as ir
    import onnxruntime as ort

    from moec.compiler.trt_legalize import legalize_for_tensorrt

    nodes = [
        helper.make_node("TopK", ["x", "k"], ["values", "ids"], sorted=0),
        helper.make_node("ConstantOfShape", ["shape"], ["empty"],
                         value=helper.make_tensor("v", TensorProto.BOOL, [1], [False])),
        helper.make_node("Cast", ["ones_f"], ["ones"], to=TensorProto.BOOL),
        helper.make_node("ScatterElements", ["empty", "ids", "ones"], ["mask"], axis=1),
        helper.make_node("Equal", ["mask", "mask2"], ["same"]),
        helper.make_node("NonZero", ["mask2"], ["where"]),
        helper.make_node("Clip", ["n", "low", "high"], ["clipped"]),
        helper.make_node("CumSum", ["n", "axis"], ["sums"]),
    ]  # fmt: skip
    model = _model(
        nodes,
        [
            _value("x", shape=(3, 6)),
            _value("mask2", TensorProto.BOOL, (3, 6)),
            _value("n", TensorProto.INT64, (5,)),
        ],
        [
            _value("mask", TensorProto.BOOL, (3, 6)),
            _value("same", TensorProto.BOOL, (3, 6)),
            _value("where", TensorProto.INT64, (2, None)),
            _value("clipped", TensorProto.INT64, (5,)),
            _value("sums", TensorProto.INT64, (5,)),
        ],
        [
            helper.make_tensor("low", TensorProto.INT64, [], [-3]),
            helper.make_tensor("high", TensorProto.INT64, [], [1 << 40]),
            helper.make_tensor("axis", TensorProto.INT64, [], [0]),
            helper.make_tensor("k", TensorProto.INT64, [1], [2]),
            helper.make_tensor("shape", TensorProto.INT64, [2], [3, 6]),
            helper.make_tensor("ones_f", TensorProto.FLOAT, [3, 2], [1.0] * 6),
        ],
    )
    assert len(check_trt(model)) == 6  # TopK unsorted; scatter, Equal and NonZero of booleans;
    # Clip and CumSum of integers
    rewritten = ir.from_proto(onnx.shape_inference.infer_shapes(model))  # types, as exported
    legalize_for_tensorrt(rewritten)
    rewritten = ir.to_proto(rewritten)
    assert check_trt(rewritten) == []
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((3, 6), np.float32),
        "mask2": rng.random((3, 6)) > 0.5,
        "n": np.array([-(1 << 41), -2, 7, 1 << 41, 3]),
    }
    feeds_small = {**feeds, "n": np.array([-5, -2, 7, 900, 3])}
    names = ["mask", "same", "where", "clipped", "sums"]

    def run(m, given):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(names, given)

    for before, after in zip(run(model, feeds), run(rewritten, feeds), strict=True):
        assert after.dtype == before.dtype  # the names and types of the outputs are kept
    for name, before, after in zip(names, run(model, feeds), run(rewritten, feeds), strict=True):
        if name != "sums":  # exact for any values
            assert np.array_equal(before, after), name
    # the integer cumsum in float32: exact while its partial sums stay below 2^24
    assert np.array_equal(run(model, feeds_small)[-1], run(rewritten, feeds_small)[-1])
