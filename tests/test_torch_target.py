"""The `torch` target: a .pt2 whose moec::moe nodes run moec's kernel, loaded by moec.load."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import moec
from moec.compiler.moe_block import MoEBlock
from moec.errors import InputError, LoweringError
from moec.ir import WEIGHT_NAMES, MoESpec, MoEWeights
from moec.models import build_zoo


def test_torch_artifact_runs_moecs_kernel(tmp_path):
    result = moec.compile("zoo:deepseek-lm", target="torch", output=tmp_path / "a")
    assert [f.path for f in result.manifest.files.values()] == ["model.pt2"]
    assert {b.lowering for b in result.blocks} <= {"kernel", "grouped_mm"}
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


def test_runner_checks_inputs_once(tmp_path):
    """The runner checks feeds against the manifest, so the exported module's per-call pytree
    check of the same inputs is off, and so is its pytree code (flat tensors in, a flat tuple
    out: the same numbers); a feed the program cannot take still fails, naming it."""
    result = moec.compile("zoo:mixtral", target="torch", output=tmp_path / "a")
    x = np.random.default_rng(0).standard_normal((2, 3, 32), np.float32)
    with moec.load(result.path, pack=False) as runner:
        assert runner.module.validate_inputs is False
        assert type(runner.module.graph._codegen) is torch.fx.graph.CodeGen
        stored = torch.export.load(result.path / "model.pt2").module()
        with torch.no_grad():
            expected = stored(torch.from_numpy(x))
        got = runner.module.forward(torch.from_numpy(x))
        assert isinstance(got, tuple) and isinstance(expected, tuple)
        assert len(got) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with moec.load(result.path) as runner:
        assert runner(x).shape == (2, 3, 32)
        with pytest.raises(InputError, match="input 'x' dim 2 is 31, expected 32"):
            runner(np.zeros((1, 3, 31), np.float32))


def test_grouped_mm_runs_on_the_stored_weights(tmp_path, monkeypatch):
    args = dict(target="torch", lowering="grouped_mm", output=tmp_path / "a")
    result = moec.compile("zoo:deepseek-lm", **args)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(
        torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k)
    )
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))
    with torch.no_grad():
        ref = build_zoo("deepseek-lm").model(torch.from_numpy(ids)).numpy()
    with moec.load(result.path) as runner:
        out = runner(ids)
        assert runner.packing.moe_blocks == 0 and runner.packing.linears > 0
    assert len(calls) == 3 * len(result.blocks)  # gate, up and down of every block
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


def test_grouped_mm_refuses_sizes_it_cannot_stride(tmp_path):
    spec = MoESpec(num_experts=4, top_k=2, hidden_size=12, expert_size=20, expert_kind="gated")
    g = torch.Generator().manual_seed(0)
    shapes = MoEWeights.expected_shapes(spec)
    tensors = {n: torch.randn(*s, generator=g) for n, s in shapes.items() if s is not None}
    block = MoEBlock(spec, MoEWeights(**{n: tensors.get(n) for n in WEIGHT_NAMES}))
    x = (torch.randn(1, 5, 12),)
    result = moec.compile(block, x, target="torch", autotune=True, output=tmp_path / "a")
    assert result.blocks[0].lowering == "kernel"  # the one candidate left: nothing to time
    assert "not grouped_mm: torch._grouped_mm needs sizes divisible by 8" in result.blocks[0].reason
    with pytest.raises(LoweringError, match="hidden size is 12"):
        moec.compile(block, x, target="torch", lowering="grouped_mm", output=tmp_path / "b")
