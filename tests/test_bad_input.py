"""Bad input: each case gets a clear MoecError (CLI: exit 2, one line, no traceback), and no
half-written artifact is left behind."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import moec
from moec import registry
from moec.cli import main
from moec.errors import (
    ArtifactError,
    InputError,
    LoweringError,
    SourceError,
    TargetNotBuiltError,
    UsageError,
)
from moec.registry import Lowering, Prefer, Target


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, text


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- SRC -------------------------------------------------------------------------------------
def test_missing_source(tmp_path):
    result = run_cli("compile", tmp_path / "nope.pt2", "-o", tmp_path / "out")
    assert_clean_failure(result, "nope.pt2 not found", "zoo:NAME")
    assert not (tmp_path / "out").exists()


def test_unknown_zoo_name_lists_the_zoo(tmp_path):
    result = run_cli("compile", "zoo:mixtrall", "-o", tmp_path / "out")
    assert_clean_failure(result, "zoo:mixtrall is not a zoo model", "mixtral-lm")


def test_unreadable_source(tmp_path):
    result = run_cli("compile", tmp_path, "-o", tmp_path / "out")
    assert_clean_failure(result, "is not a readable file")


@pytest.fixture(scope="module")
def pt2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    from factories import plain_mlp

    model, inputs = plain_mlp()
    torch.export.save(torch.export.export(model, inputs), path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_pt2(tmp_path, pt2_file, damage):
    data = pt2_file.read_bytes()
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a zip" * 100)
    with pytest.raises(SourceError, match=r"not a readable \.pt2 archive"):
        moec.compile(str(bad), output=tmp_path / "out")
    result = run_cli("compile", bad, "-o", tmp_path / "out")
    assert_clean_failure(result, "truncated or corrupt")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_pt2_source_compiles_and_verifies(tmp_path, pt2_file):
    result = moec.compile(str(pt2_file), target="onnx", output=tmp_path / "out")
    assert result.manifest.source["kind"] == "pt2"
    assert moec.verify(result.path)


def test_pickle_needs_trust(tmp_path):
    from factories import plain_mlp

    path = tmp_path / "model.pt"
    torch.save(plain_mlp(), path)
    result = run_cli("compile", path, "-o", tmp_path / "out")
    assert_clean_failure(result, "is a pickle", "--trust-pickle", ".pt2")
    assert not (tmp_path / "out").exists()
    result = run_cli("compile", path, "-o", tmp_path / "out", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert_clean_failure(run_cli("verify", tmp_path / "out"), "--trust-pickle")
    assert run_cli("verify", tmp_path / "out", "--trust-pickle").exit_code == 0


def test_pickled_bare_module_needs_example_inputs(tmp_path):
    from factories import plain_mlp

    model, (x,) = plain_mlp()
    torch.save(model, tmp_path / "bare.pt")
    result = run_cli("compile", tmp_path / "bare.pt", "-o", tmp_path / "out", "--trust-pickle")
    assert_clean_failure(result, "--example-inputs")
    np.savez(tmp_path / "x.npz", x=x.numpy())
    result = run_cli(
        "compile",
        tmp_path / "bare.pt",
        "-o",
        tmp_path / "out",
        "--trust-pickle",
        "--example-inputs",
        tmp_path / "x.npz",
    )
    assert result.exit_code == 0, result.output


def test_factory_that_does_not_exist(tmp_path):
    assert_clean_failure(
        run_cli("compile", "factories:nothing", "-o", tmp_path / "o"), "no callable"
    )
    assert_clean_failure(run_cli("compile", "no_such_mod:f", "-o", tmp_path / "o"), "cannot import")


def test_a_factory_in_the_current_directory_is_found_as_python_m_finds_it(tmp_path, monkeypatch):
    (tmp_path / "my_factory.py").write_text(
        "from moec.models import build_zoo\n\n"
        "def make():\n    s = build_zoo('mixtral')\n    return s.model, s.example_inputs\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    result = run_cli("compile", "my_factory:make", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert str(tmp_path) not in sys.path  # looked there for this import only
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.delitem(sys.modules, "my_factory")
    missing = run_cli("compile", "my_factory:make", "-o", tmp_path / "out2")
    assert_clean_failure(missing, "and in the current directory")


def test_model_without_moe_compiles_and_says_so(tmp_path):
    result = run_cli("compile", "factories:plain_mlp", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "no MoE block found" in result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["blocks"] == [] and "no MoE block found" in manifest["notes"][0]
    # the recorded source is a factory: rebuilding it runs its code, so the user says so
    assert run_cli("verify", tmp_path / "out", "--trust-source").exit_code == 0


def test_op_without_lowering_is_named(tmp_path):
    with pytest.raises(LoweringError, match=r"moectest\.mystery\.default") as info:
        moec.compile("factories:unlowerable", output=tmp_path / "out")
    assert "node mystery" in str(info.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    assert_clean_failure(
        run_cli("compile", "factories:unlowerable", "-o", tmp_path / "out"), "no ONNX translation"
    )


def test_a_target_this_build_cannot_compile_says_so(tmp_path):
    lowering = Lowering("later-gather", ("later",), "", onnx="moec.compiler.lower_moe_gather:x")
    unbuilt = Target(
        "later", "a target this build lacks", {"model": "m"}, (Prefer("later-gather"),),
        unavailable="--target later is not built in this version of moec",
    )  # fmt: skip
    with registry.registered(lowering, unbuilt):
        with pytest.raises(TargetNotBuiltError, match="not built"):
            moec.compile("zoo:mixtral", target="later", output=tmp_path / "out")
        assert_clean_failure(
            run_cli("compile", "zoo:mixtral", "-t", "later", "-o", tmp_path / "o"), "not built"
        )


# -- OUT -------------------------------------------------------------------------------------
@pytest.fixture
def artifact(tmp_path, zoo_artifact):
    """A private copy of a compiled zoo:mixtral-lm artifact (tests may damage it)."""
    import shutil

    out = tmp_path / "art"
    shutil.copytree(zoo_artifact("mixtral-lm", "ort").path, out)
    return out


def test_existing_output_needs_force(tmp_path, artifact):
    before = (artifact / "manifest.json").read_text()
    result = run_cli("compile", "factories:plain_mlp", "-o", artifact)
    assert_clean_failure(result, "already exists", "--force")
    assert (artifact / "manifest.json").read_text() == before
    result = run_cli("compile", "factories:plain_mlp", "-o", artifact, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((artifact / "manifest.json").read_text())["blocks"] == []
    assert not leftovers(tmp_path)


def test_force_never_replaces_a_directory_that_is_not_an_artifact(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("keep me")
    result = run_cli("compile", "zoo:mixtral", "-o", tmp_path / "home", "--force")
    assert_clean_failure(result, "not a moec artifact")
    assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"


def edit_manifest(path, change):
    data = json.loads((path / "manifest.json").read_text())
    change(data)
    (path / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "manifest.json").write_text("{not json"), "is not valid JSON"),
        (lambda p: (p / "manifest.json").unlink(), "has no manifest.json"),
        (lambda p: edit_manifest(p, lambda d: d.pop("inputs")), "needs 'inputs'"),
        (
            lambda p: edit_manifest(p, lambda d: d["inputs"][0].update(dtype="float99")),
            "'dtype' must be one of",
        ),
        (lambda p: edit_manifest(p, lambda d: d.update(format_version=99)), "format_version 99"),
        (lambda p: (p / "model.onnx").unlink(), "is missing"),
        (lambda p: (p / "model.onnx.data").write_bytes(b"0" * 10), "does not match"),
        (
            lambda p: edit_manifest(p, lambda d: d["files"]["model"].update(path="../x.onnx")),
            "plain file name",
        ),
    ],
    ids=[
        "manifest-not-json",
        "manifest-missing",
        "manifest-field-removed",
        "manifest-bad-dtype",
        "manifest-format-version",
        "model-file-missing",
        "weights-edited",
        "path-escape",
    ],
)
def test_damaged_artifact_is_refused_at_load(artifact, damage, message):
    damage(artifact)
    with pytest.raises(ArtifactError, match=message):
        moec.load(artifact)
    assert_clean_failure(run_cli("verify", artifact), message.strip("'"))
    assert_clean_failure(run_cli("inspect", artifact), message.strip("'"))


# -- run-time inputs -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"ids": np.zeros((1, 4), np.int64)}, "unknown input(s) ['ids']"),
        ({}, "missing input(s) ['input_ids', 'attention_mask'"),
        ({"input_ids": np.zeros((1, 4), np.int32)}, "dtype int32, expected int64"),
        ({"input_ids": np.zeros(4, np.int64)}, "rank 1"),
        (
            {"input_ids": np.zeros((1, 65), np.int64)},
            "dim 1 (sequence_length) is 65; it must be [1, 64]",
        ),
        ({"input_ids": np.full((1, 4), 300, np.int64)}, "outside the valid range [0, 256)"),
        ({"input_ids": [[1, 2]]}, "is a list"),
    ],
)
def test_wrong_inputs_at_run_time(artifact, feeds, message):
    """Refused even after a good call (the runner remembers the layouts of good feeds and
    checks only their values again)."""
    with moec.load(artifact) as runner:
        runner.infer({"input_ids": np.zeros((1, 4), np.int64)})
        with pytest.raises(InputError) as info:
            runner.infer(feeds)
    assert message in str(info.value)


def test_a_runner_used_outside_its_with_block_is_a_usage_error(artifact):
    runner = moec.load(artifact)
    runner.deactivate()
    feeds = {"input_ids": np.zeros((1, 4), np.int64)}
    with pytest.raises(UsageError, match="is not active; use it in a with-block"):
        runner.infer(feeds)
    assert not isinstance(UsageError("x"), InputError)
    assert runner(feeds["input_ids"]).shape == (1, 4, 256)  # calling it activates it


def test_wrong_input_through_cli_run(tmp_path, artifact):
    np.savez(tmp_path / "x.npz", input_ids=np.zeros((1, 4), np.float32))
    assert_clean_failure(run_cli("run", artifact, "--input", tmp_path / "x.npz"), "dtype float32")


def test_static_dim_mismatch(tmp_path, zoo_artifact):
    with (
        moec.load(zoo_artifact("mixtral", "onnx").path) as runner,
        pytest.raises(InputError) as info,
    ):
        runner.infer({"x": np.zeros((1, 3, 31), np.float32)})
    assert "dim 2 is 31, expected 32" in str(info.value)


def test_verify_refuses_a_different_source(artifact):
    result = run_cli("verify", artifact, "--source", "zoo:qwen-moe-lm")
    assert_clean_failure(result, "not the model this artifact was compiled from")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--capacity-factor", "0"], "--capacity-factor must be a number > 0"),
        (["--capacity-factor", "-1.5"], "--capacity-factor must be a number > 0"),
        (["--capacity-factor", "lots"], "'lots' is not a valid float"),
        (["-t", "onnx", "--lowering", "fused"], "it can run: gather, counting, capacity, dense"),
        (["-t", "torch", "--lowering", "capacity"], "it can run: kernel"),
        (["--lowering", "gather", "--capacity", "auto"], "cannot be combined with --lowering"),
    ],
)
def test_bad_lowering_options(tmp_path, args, message):
    result = run_cli("compile", "zoo:mixtral", "-o", tmp_path / "out", *args)
    assert_clean_failure(result, message)
    assert not (tmp_path / "out").exists()
