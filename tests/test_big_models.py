"""Models bigger than memory: an ``hf:`` checkpoint compiled with its weights left on disk
(streamed into the artifact one tensor at a time), verified layer by layer, with its external
data cut into shards; and what a damaged checkpoint or a full disk are told."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hf_families import build_tiny, save_tiny

import moec
from moec.cli import main
from moec.errors import SourceError
from moec.models import lazy_weights
from moec.models.checkpoint import Checkpoint
from moec.models.hf_models import load_hf_dir
from moec.runtime.manifest import Manifest
from moec.runtime.staged_ort_runner import StagedOrtRunner

IDS = np.random.default_rng(0).integers(0, 100, (2, 7))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny("mixtral", tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def streamed(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "out"
    return moec.compile(f"hf:{checkpoint}", target="ort", output=out).path


def test_a_checkpoint_is_compiled_without_reading_its_weights_before_writing(
    checkpoint, tmp_path, monkeypatch
):
    reads, seen = [], {}
    read = lazy_weights.read_stored
    monkeypatch.setattr(
        lazy_weights, "read_stored", lambda stored: reads.append(stored) or read(stored)
    )
    result = moec.compile(
        f"hf:{checkpoint}",
        target="onnx",
        output=tmp_path / "out",
        on_stage=lambda name: seen.setdefault(name, len(reads)),
    )
    assert seen["emit"] == 0 and reads, seen  # nothing read before the weights are written
    stored = len(Checkpoint(checkpoint).tensors)
    assert len(reads) <= 2 * stored, (len(reads), stored)  # an expert's slice reads that expert
    assert any("streamed from the checkpoint" in note for note in result.notes)
    assert result.manifest.decoding  # the cache's layout was read on fake tensors
    model = build_tiny("mixtral")
    with moec.load(result.path) as runner, torch.no_grad():
        expected = model(torch.from_numpy(IDS)).logits.numpy()
        np.testing.assert_allclose(runner(IDS), expected, atol=2e-5)
    assert moec.verify(result.path)


def test_the_streamed_artifact_runs_as_the_one_compiled_in_memory(streamed, tmp_path):
    model = build_tiny("mixtral")
    mask = torch.ones(2, 7, dtype=torch.int64)
    in_memory = moec.compile(model, (torch.from_numpy(IDS), mask), output=tmp_path / "m").path
    with moec.load(streamed) as a, moec.load(in_memory) as b:
        np.testing.assert_array_equal(a(IDS), b(IDS, mask.numpy()))


def test_staged_runner_gives_the_whole_graphs_outputs(streamed):
    manifest = Manifest.read(streamed)
    with StagedOrtRunner(manifest, streamed, stage_bytes=0) as staged, moec.load(streamed) as whole:
        assert len(staged.stages) >= 2  # a stage per decoder layer
        for shape in ((1, 1), (2, 7), (3, 16)):
            ids = np.random.default_rng(sum(shape)).integers(0, 100, shape)
            feeds = whole.completed({"input_ids": ids})
            a, b = whole.infer(feeds), staged.infer(feeds)
            assert a.keys() == b.keys()
            for name in a:  # its sessions do not prepack weights: float32 rounding may differ
                if a[name].dtype.kind == "f":
                    np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
                else:
                    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_verify_by_layers(streamed, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("moec.runtime.staged_ort_runner.STAGE_BYTES", 0)
    result = CliRunner().invoke(main, ["verify", str(streamed), "--by-layers"])
    assert result.exit_code == 0, result.output
    assert "the artifact ran by layers (2 stage(s)" in result.output
    assert "PASS" in result.output


def test_verify_by_layers_needs_an_onnx_artifact(checkpoint, tmp_path):
    out = moec.compile(f"hf:{checkpoint}", target="torch", output=tmp_path / "t").path
    result = CliRunner().invoke(main, ["verify", str(out), "--by-layers"])
    assert result.exit_code == 2
    assert "--by-layers runs ONNX artifacts" in result.output


def test_weights_over_the_shard_size_are_written_in_shards(
    checkpoint, streamed, tmp_path, monkeypatch
):
    monkeypatch.setattr("moec.compiler.onnx_artifact.SHARD_BYTES", 200_000)
    out = moec.compile(f"hf:{checkpoint}", target="ort", output=tmp_path / "out").path
    manifest = json.loads((out / "manifest.json").read_text())
    shards = sorted(role for role in manifest["files"] if role.startswith("weights"))
    assert len(shards) >= 3 and "weights.2" in shards, shards
    with moec.load(out) as a, moec.load(streamed) as b:
        np.testing.assert_array_equal(a(IDS), b(IDS))
    damaged = out / manifest["files"]["weights.2"]["path"]
    damaged.write_bytes(b"\0" * damaged.stat().st_size)
    with pytest.raises(moec.MoecError, match="different sha256"):
        moec.load(out)


def _sharded(checkpoint: Path, directory: Path) -> Path:
    build_tiny("mixtral").save_pretrained(directory, max_shard_size="100KB")
    return directory


def test_a_missing_shard_is_named_with_a_tensor_it_holds(tmp_path):
    directory = _sharded(tmp_path, tmp_path / "model")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (directory / shard).unlink()
    held = next(k for k, v in index["weight_map"].items() if v == shard)
    for target in ("ort", "torch"):  # streamed, and built in memory
        with pytest.raises(SourceError, match=f"shard {shard} is missing \\(it holds {held}"):
            moec.compile(f"hf:{directory}", target=target, output=tmp_path / target)


def test_a_truncated_checkpoint_is_named_with_the_tensor_cut(tmp_path):
    directory = _sharded(tmp_path, tmp_path / "model")
    shard = sorted(directory.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(SourceError, match=f"{shard.name} is truncated: tensor .* ends at byte"):
        moec.compile(f"hf:{directory}", target="ort", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_said_and_leaves_nothing_behind(checkpoint, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "moec", "compile", f"hf:{checkpoint}", "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(200_000),  # the weights are ~1 MB
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2, done.stderr
    assert "the disk filled while writing the artifact" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS: Linux")
def test_a_model_bigger_than_the_memory_cap_compiles_and_verifies(tmp_path):
    """Under an address-space cap below the checkpoint's size, compile and verify (by layers)
    pass: neither holds the weights, whole, in memory."""
    script = Path(__file__).with_name("memory_capped.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["cap"] < figures["weights"] and figures["verified_by_layers"], figures


def test_a_compile_in_memory_that_will_not_fit_says_so_before_loading(checkpoint, monkeypatch):
    monkeypatch.setattr("moec.pipeline.available_memory", lambda: 1000)
    monkeypatch.setattr("moec.compiler.sources.load_hf_dir", None)  # never reached
    with pytest.raises(moec.MoecError) as caught:
        moec.compile(f"hf:{checkpoint}", target="torch", output=checkpoint.parent / "t")
    message = str(caught.value)
    assert f"--target torch builds hf:{checkpoint} in memory: that needs about 1.1 GB" in message
    assert "this process may use 0.0 GB. Compile for --target ort or onnx" in message


def test_a_bf16_checkpoint_compiled_to_bf16_is_never_upcast(tmp_path, caplog):
    build_tiny("mixtral").to(torch.bfloat16).save_pretrained(tmp_path / "model")
    model = load_hf_dir(str(tmp_path / "model"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with caplog.at_level("WARNING"):
        out = moec.compile(
            f"hf:{tmp_path / 'model'}", target="torch", dtype="bf16", output=tmp_path / "out"
        ).path
    assert "builds the model in float32" not in caplog.text
    assert moec.verify(out)


def test_a_checkpoint_missing_a_weight_is_built_in_memory_as_transformers_does(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    directory = save_tiny("mixtral", tmp_path / "model")
    weights = load_file(directory / "model.safetensors")
    del weights["model.norm.weight"]  # transformers initialises it (and warns)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        result = moec.compile(f"hf:{directory}", target="ort", output=tmp_path / "out")
    assert "no tensor for 1 weight(s) of the model (model.norm.weight" in caplog.text
    assert "building the model in memory" in caplog.text
    assert not any("streamed" in note for note in result.notes)


def test_an_artifact_that_hashed_the_built_model_still_verifies(checkpoint, tmp_path):
    """Artifacts compiled before moec hashed the checkpoint's files recorded the sha256 of the
    model it built; verify compares that instead."""
    from moec.compiler.sources import weights_sha256
    from moec.models.hf_models import hf_model_source

    out = moec.compile(f"hf:{checkpoint}", target="ort", output=tmp_path / "out").path
    manifest = json.loads((out / "manifest.json").read_text())
    built = hf_model_source(load_hf_dir(str(checkpoint))).model
    manifest["source"]["sha256"] = weights_sha256(built)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert moec.verify(out)
    manifest["source"]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(moec.MoecError, match="not the model this artifact was compiled from"):
        moec.verify(out)


def test_a_streamed_model_may_move_its_input_to_a_layers_device(tmp_path):
    """Llama 4 calls ``embed_tokens(input_ids.to(embed_tokens.weight.device))`` before the
    embedding's weight is read from disk: its input must stay where it is, not go to meta."""
    from moec.models.hf_lazy import load_hf_dir_lazily
    from moec.models.layer_streaming import stream_layers

    directory = save_tiny("llama4", tmp_path / "llama4")
    streamed = load_hf_dir_lazily(str(directory))
    stream_layers(streamed)
    ids = torch.from_numpy(IDS)
    with torch.no_grad():
        expected = load_hf_dir(str(directory))(ids, use_cache=False).logits
        torch.testing.assert_close(streamed(ids, use_cache=False).logits, expected)
