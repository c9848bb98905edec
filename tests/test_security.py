"""Safe to load what strangers send: a crafted ``.pt2`` runs nothing, as a source or as a
``torch`` artifact, unless the user opts in with ``--trust-pickle``."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from crafted import KINDS, craft

import moec
from moec.cli import main
from moec.errors import ArtifactError, SourceError
from moec.models import build_zoo
from moec.runtime.manifest import file_sha256

PROGRESS = re.compile(r"\[\d+/\d+\] ")  # moec compile's progress lines in a pipe


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def torch_artifact(tmp_path_factory):
    """zoo:mixtral-lm compiled for the torch target (its program has dynamic dims)."""
    out = tmp_path_factory.mktemp("torch") / "art"
    return moec.compile("zoo:mixtral-lm", target="torch", output=out).path


def resign(artifact):
    """Update the manifest's size and sha256 of the model file, as an attacker would."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    model = manifest["files"]["model"]
    path = artifact / model["path"]
    model.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    (artifact / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_pt2_source_runs_nothing(tmp_path, torch_artifact, kind):
    marker = tmp_path / "marker"
    bad = craft(kind, torch_artifact / "model.pt2", tmp_path / "bad.pt2", marker)
    with pytest.raises(SourceError, match="would run code when loaded") as info:
        moec.compile(str(bad), target="ort", output=tmp_path / "out")
    assert "--trust-pickle" in str(info.value)
    for command in (["compile", bad, "-o", tmp_path / "o"], ["inspect", bad]):
        result = run_cli(*command)
        assert result.exit_code == 2 and "would run code" in result.output, result.output
        assert "Traceback" not in result.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_torch_artifact_runs_nothing(tmp_path, torch_artifact, kind):
    marker = tmp_path / "marker"
    artifact = shutil.copytree(torch_artifact, tmp_path / "art")
    craft(kind, torch_artifact / "model.pt2", artifact / "model.pt2", marker)
    resign(artifact)
    with pytest.raises(ArtifactError, match=r"model .* would run code when loaded"):
        moec.load(artifact)
    np.savez(tmp_path / "x.npz", input_ids=np.zeros((1, 4), np.int64))
    for command in (["run", artifact, "--input", tmp_path / "x.npz"], ["verify", artifact]):
        result = run_cli(*command)
        assert result.exit_code == 2 and "would run code" in result.output, result.output
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["sample-inputs", "pickled-weight"])
def test_trust_pickle_is_the_opt_in(tmp_path, torch_artifact, kind):
    """With the flag, torch loads the archive as it would (the payload runs: that is what
    trusting a pickle means); the refusal above is moec's, not torch's failing to load it."""
    marker = tmp_path / "marker"
    bad = craft(kind, torch_artifact / "model.pt2", tmp_path / "bad.pt2", marker)
    # the payload replaced a tensor, so the program may not trace; it has run by then
    with contextlib.suppress(moec.MoecError):
        moec.compile(str(bad), target="ort", output=tmp_path / "out", trust_pickle=True)
    assert marker.exists()


def test_a_damaged_pt2_is_refused_in_one_line(tmp_path, torch_artifact):
    """torch logs its own traceback for a damaged archive; moec says it once."""
    truncated = tmp_path / "cut.pt2"
    truncated.write_bytes((torch_artifact / "model.pt2").read_bytes()[:5000])
    command = [
        sys.executable,
        "-m",
        "moec.cli",
        "compile",
        str(truncated),
        "-o",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    lines = [line for line in lines if not PROGRESS.match(line)]  # [1/5] load (0.4 s)
    assert done.returncode == 2
    assert len(lines) == 1 and "not a readable .pt2 archive" in lines[0], lines


# -- sources the artifact names ---------------------------------------------------------------
def test_verify_runs_no_factory_the_manifest_names(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MOEC_TEST_MARKER", str(marker))
    out = moec.compile("factories:marking_mixtral_block", output=tmp_path / "out").path
    marker.unlink()
    result = run_cli("verify", out)
    assert result.exit_code == 2, result.output
    assert "--source factories:marking_mixtral_block" in result.output
    assert "--trust-source" in result.output and not marker.exists()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"].update(spec="os:abort")  # what an attacker's manifest would say
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("verify", out).exit_code == 2 and not marker.exists()
    assert run_cli("verify", out, "--source", "factories:marking_mixtral_block").exit_code == 0
    assert marker.exists()  # the user's own SRC runs: they typed it


def test_verify_rebuilds_a_trusted_factory(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_TEST_MARKER", str(tmp_path / "marker"))
    out = moec.compile("factories:marking_mixtral_block", output=tmp_path / "out").path
    assert run_cli("verify", out, "--trust-source").exit_code == 0


# -- hf: directories that ship code ------------------------------------------------------------
def remote_code_dir(tmp_path, marker):
    """An hf: directory whose config names a model type defined by its own Python file."""
    directory = tmp_path / "remote"
    directory.mkdir()
    config = {
        "model_type": "moec_evil",
        "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'moec_evil'\n"
    )
    return directory


def test_an_hf_directory_runs_none_of_its_code(tmp_path):
    marker = tmp_path / "marker"
    directory = remote_code_dir(tmp_path, marker)
    for command in (
        ["compile", f"hf:{directory}", "-o", tmp_path / "o"],
        ["inspect", f"hf:{directory}"],
    ):
        result = run_cli(*command)
        assert result.exit_code == 2, result.output
        assert "auto_map" in result.output and "--trust-remote-code" in result.output
    assert not marker.exists()
    # opting in lets transformers import it (the model itself is incomplete, so it then fails)
    run_cli("inspect", f"hf:{directory}", "--trust-remote-code")
    assert marker.exists()


# -- the manifest cannot vouch for itself ----------------------------------------------------
@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "art"
    return moec.compile("zoo:mixtral-lm", target="ort", output=out).path


def edit(artifact, change):
    manifest = json.loads((artifact / "manifest.json").read_text())
    change(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_edited_weights_fail_verify_whatever_tolerance_the_manifest_claims(tmp_path, ort_artifact):
    artifact = shutil.copytree(ort_artifact, tmp_path / "art")
    data = bytearray((artifact / "model.onnx.data").read_bytes())
    data[1000:5000] = np.random.default_rng(0).standard_normal(1000, np.float32).tobytes()
    (artifact / "model.onnx.data").write_bytes(bytes(data))
    edit(artifact, lambda m: m.update(tolerances={"rel_l2": 1e9, "routing_agreement": 0.0}))
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["weights"].update(
        bytes=len(data), sha256=file_sha256(artifact / "model.onnx.data")
    )
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("verify", artifact)
    assert result.exit_code == 1 and "FAIL" in result.output, result.output
    assert run_cli("verify", artifact, "--rel-l2", "1e9", "--agreement", "0").exit_code == 0


def test_every_file_the_model_reads_is_listed_and_checked(tmp_path, ort_artifact):
    artifact = shutil.copytree(ort_artifact, tmp_path / "art")
    edit(artifact, lambda m: m["files"].pop("weights"))
    with pytest.raises(ArtifactError, match="a file the manifest does not list"):
        moec.load(artifact)
    assert run_cli("run", artifact, "--input", tmp_path / "none.npz").exit_code == 2


def test_files_the_manifest_does_not_list_are_reported(tmp_path, ort_artifact):
    artifact = shutil.copytree(ort_artifact, tmp_path / "art")
    (artifact / "surprise.bin").write_bytes(b"x")
    verified = run_cli("verify", artifact)
    assert verified.exit_code == 0 and "surprise.bin" in verified.output
    assert "surprise.bin" in run_cli("inspect", artifact).output


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda text: text.replace('"notes": []', f'"notes": {DEEP}'), "nested too deeply"),
        (
            lambda text: text.replace('"format_version": 1', '"format_version": ' + "9" * 5000),
            "not valid JSON",
        ),
        (
            lambda text: text.replace('"value_range": [', '"value_range": ["a", "b", '),
            "value_range",
        ),
        (
            lambda text: text.replace(
                '"value_range": [\n        0', '"value_range": [\n        1e400'
            ),
            "value_range",
        ),
        (lambda text: text.replace('"notes": []', '"notes": [NaN]'), "not valid JSON"),
        (lambda text: text.replace('"target": "ort"', '"target": {"a": 1}'), "target"),
        (lambda text: text.replace('"bytes": ', '"bytes": -'), "bytes"),
        (lambda text: text.replace('"role": "routing"', '"role": "evil"'), "'role' must be one of"),
    ],
    ids=[
        "deep",
        "long-int",
        "range-strings",
        "range-inf",
        "nan",
        "target-object",
        "negative-bytes",
        "role",
    ],
)
def test_a_malformed_manifest_gets_one_clear_line(tmp_path, ort_artifact, change, message):
    artifact = shutil.copytree(ort_artifact, tmp_path / "art")
    text = (artifact / "manifest.json").read_text()
    changed = change(text)
    assert changed != text
    (artifact / "manifest.json").write_text(changed)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        moec.load(artifact)
    for command in (["verify", artifact], ["inspect", artifact]):
        result = run_cli(*command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_a_string_tolerance_is_ignored_not_a_traceback(tmp_path, ort_artifact):
    artifact = shutil.copytree(ort_artifact, tmp_path / "art")
    edit(artifact, lambda m: m.update(tolerances={"rel_l2": "lots"}))
    assert run_cli("verify", artifact).exit_code == 0


# -- inputs that gave silently wrong outputs ---------------------------------------------------
@pytest.mark.parametrize("target", ["ort", "torch"])
def test_big_endian_inputs_give_the_native_results(tmp_path, target):
    path = moec.compile("zoo:mixtral-lm", target=target, output=tmp_path / "a").path
    ids = np.random.default_rng(0).integers(0, 256, (2, 7))
    with moec.load(path) as runner:
        native = runner(ids)
        swapped = runner(ids.astype(">i8"))
        again = runner(ids.astype(">i8"))  # a second call takes the checked-layout path
    np.testing.assert_array_equal(native, swapped)
    np.testing.assert_array_equal(native, again)
    block = build_zoo("mixtral")
    path = moec.compile(
        block.model, block.example_inputs, target=target, output=tmp_path / "b"
    ).path
    x = np.random.default_rng(1).standard_normal((1, 5, 32)).astype(np.float32)
    with moec.load(path) as runner:
        np.testing.assert_array_equal(runner(x), runner(x.astype(">f4")))


NONFINITE_CASES = [
    ("mixtral", "ort", None),  # com.microsoft.MoE with its own softmax routing
    ("mixtral", "ort", "gather"),
    ("switch", "onnx", None),  # capacity routing: a NaN token gets no expert
    ("switch", "torch", None),
    ("switch", "torch", "grouped_mm"),
    ("deepseek", "ort", None),  # MoEGroupRouter
    ("deepseek", "torch", None),
]


@pytest.mark.parametrize(("zoo", "target", "lowering"), NONFINITE_CASES)
def test_a_nonfinite_token_is_nan_out_as_in_eager(tmp_path, zoo, target, lowering):
    block = build_zoo(zoo)
    args = dict(target=target, output=tmp_path / "a")
    if lowering:
        args["lowering"] = lowering
    path = moec.compile(block.model, block.example_inputs, **args).path
    hidden = block.example_inputs[0].shape[-1]
    x = np.random.default_rng(0).standard_normal((1, 6, hidden)).astype(np.float32)
    x[0, 2, 3] = np.nan  # one token: eager Switch drops a second NaN token by capacity
    with torch.no_grad():
        ref = block.model(torch.from_numpy(x)).numpy()
    out = moec.load(path)(x)
    bad = ~np.isfinite(out).all(-1)
    assert (bad == ~np.isfinite(ref).all(-1)).all() and bad[0].tolist() == [0, 0, 1, 0, 0, 0]
    np.testing.assert_allclose(out[~bad], ref[~bad], rtol=1e-4, atol=1e-5)


def test_a_nonfinite_token_alone_on_the_torch_one_token_path(tmp_path):
    """One token routed by the family's router takes `PackedMoE`'s one-token path."""
    from test_external_routing import SPEC, _weights

    from moec.compiler.moe_block import MoEExpertsBlock

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Linear(SPEC.hidden_size, SPEC.num_experts, bias=False)
            self.experts = MoEExpertsBlock(SPEC, _weights())

        def forward(self, x):
            weights, ids = self.router(x).softmax(-1).topk(SPEC.top_k, dim=-1)
            return self.experts(x, ids, weights)

    model = Routed().eval()
    example = (torch.randn(4, SPEC.hidden_size),)
    path = moec.compile(model, example, target="torch", output=tmp_path / "a").path
    x = np.full((1, SPEC.hidden_size), np.nan, np.float32)
    with moec.load(path) as runner:
        assert runner.packing.moe_blocks == 1
        assert np.isnan(runner(x)).all()


def test_a_meta_tensor_is_an_input_error(tmp_path):
    path = moec.compile("zoo:mixtral", target="ort", output=tmp_path / "a").path
    with pytest.raises(moec.MoecError, match="meta tensor, which has no values"):
        moec.load(path)(torch.empty(1, 3, 32, device="meta"))


# -- crafted data files -------------------------------------------------------------------------
def craft_external_data(artifact, change):
    import onnx

    path = artifact / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(
        t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    )
    change(tensor)
    onnx.save(model, str(path))
    resign(artifact)


def set_external(tensor, key: str, value: str) -> None:
    next(e for e in tensor.external_data if e.key == key).value = value


@pytest.mark.parametrize(
    "change",
    [
        lambda t: set_external(t, "offset", "99999999"),
        lambda t: t.dims.__setitem__(0, 10**9),
        lambda t: set_external(t, "location", "../x"),
    ],
    ids=["offset-past-the-end", "huge-shape", "location-outside"],
)
def test_crafted_onnx_external_data_is_refused(tmp_path, ort_artifact, change):
    artifact = shutil.copytree(ort_artifact, tmp_path / "art")
    craft_external_data(artifact, change)
    with pytest.raises(ArtifactError, match="compile the artifact again"):
        moec.load(artifact)


def test_crafted_safetensors_is_refused(tmp_path):
    import struct

    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 256, (12, 16)))
    out = tmp_path / "lossy"
    moec.compile("zoo:mixtral-lm", output=out, calib=str(tmp_path / "ids.npy"), merge_experts=0.5)
    path = out / "compressed.safetensors"
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [0, 10**12]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["compressed"].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("verify", out)
    assert result.exit_code == 2 and "cannot read compressed.safetensors" in result.output


def test_dims_that_would_need_huge_inputs_are_refused_by_verify(tmp_path, ort_artifact):
    artifact = shutil.copytree(ort_artifact, tmp_path / "art")
    edit(artifact, lambda m: m["inputs"][0]["shape"][0].update(min=2**31, max=None))
    result = run_cli("verify", artifact)
    assert result.exit_code == 2 and "more than moec generates" in result.output, result.output
