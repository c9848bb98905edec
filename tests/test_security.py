"""Safe to load what strangers send: a crafted ``.pt2`` runs nothing, as a source or as a
``torch`` artifact, unless the user opts in with ``--trust-pickle``."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from crafted import KINDS, craft

import moec
from moec.cli import main
from moec.errors import ArtifactError, SourceError
from moec.runtime.manifest import file_sha256


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
    assert done.returncode == 2
    assert len(lines) == 1 and "not a readable .pt2 archive" in lines[0], lines
