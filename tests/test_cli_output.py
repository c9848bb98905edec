"""What the CLI prints in a pipe or a CI log: whole names, progress as it goes, one-line errors."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from hf_families import save_tiny

from moec.cli import main


def test_a_compile_in_a_pipe_prints_progress_lines_and_whole_names(tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    directory = save_tiny("qwen2_moe", tmp_path / "model")
    result = CliRunner().invoke(
        main, ["-v", "compile", f"hf:{directory}", "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("[1/5] load (") and any(x.startswith("[5/5] emit") for x in lines)
    assert "model.model.layers.1.mlp.experts " in result.output  # not "model.model.l…"
    assert "…" not in result.output
    assert "onnxscript" not in result.output  # -v: moec's own log lines only


def test_an_error_is_one_line_with_nothing_before_it(tmp_path):
    result = CliRunner().invoke(main, ["compile", "zoo:nope", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[0].startswith("[1/5] load (")
    assert lines[1].startswith("error: zoo:nope is not a zoo model") and len(lines) == 2


def test_an_input_error_names_the_whole_expected_shape(tmp_path, zoo_artifact):
    np.savez(tmp_path / "x.npz", input_ids=np.zeros(3, np.int64))
    art = str(zoo_artifact("mixtral-lm", "ort").path)
    result = CliRunner().invoke(main, ["run", art, "--input", str(tmp_path / "x.npz")])
    assert result.exit_code == 2
    assert result.output.strip().endswith("expected rank 2: [batch, sequence_length]")
