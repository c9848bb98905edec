"""The `torch` target: a .pt2 whose moec::moe nodes run moec's kernel, loaded by moec.load."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

import moec
from moec.models import build_zoo


def test_torch_artifact_runs_moecs_kernel(tmp_path):
    result = moec.compile("zoo:deepseek-lm", target="torch", output=tmp_path / "a")
    assert [f.path for f in result.manifest.files.values()] == ["model.pt2"]
    assert {b.lowering for b in result.blocks} == {"kernel"}
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))
    with torch.no_grad():
        ref = build_zoo("deepseek-lm").model(torch.from_numpy(ids)).numpy()
    out = moec.load(result.path)(ids)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_pt2_needs_moecs_op_registered(tmp_path):
    result = moec.compile("zoo:mixtral", target="torch", output=tmp_path / "a")
    path = result.path / "model.pt2"
    plain = run_python(f"import torch; torch.export.load({str(path)!r})")
    assert plain.returncode != 0 and "moec" in plain.stderr
    through_moec = run_python(
        "import numpy as np, moec; "
        f"m = moec.load({str(result.path)!r}); "
        "print(m(np.zeros((1, 3, 32), np.float32)).shape)"
    )
    assert through_moec.returncode == 0, through_moec.stderr
    assert "(1, 3, 32)" in through_moec.stdout
