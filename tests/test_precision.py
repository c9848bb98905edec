"""``--dtype fp32|fp16|bf16``: weights and activations in that precision with routers kept in
float32, verified against the float32 source by moec's tolerances for the dtype, and a dtype
the target's runtime cannot run refused at compile time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import moec
from moec.cli import main
from moec.errors import SettingsError


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    ("target", "dtype", "name"),
    [("ort", "fp16", "float16"), ("torch", "fp16", "float16"), ("torch", "bf16", "bfloat16")],
)
def test_a_reduced_precision_artifact_verifies_against_the_float32_source(
    tmp_path, target, dtype, name
):
    result = run_cli("compile", "zoo:mixtral-lm", "-t", target, "--dtype", dtype, "-o", tmp_path)
    assert result.exit_code == 2  # tmp_path exists: the usual refusal, before any work
    out = tmp_path / "a"
    result = run_cli("compile", "zoo:mixtral-lm", "-t", target, "--dtype", dtype, "-o", out)
    assert result.exit_code == 0, result.output
    manifest = moec.load(out).manifest
    assert manifest.settings["dtype"] == dtype
    assert [o.dtype for o in manifest.main_outputs] == [name]
    report = moec.verify(out)
    assert report, report.to_dict()
    assert 0 < report.outputs[0].rel_l2 < report.outputs[0].tolerance
    assert report.outputs[0].tolerance > 1e-5  # the dtype's tolerance, not float32's


def test_bf16_runs_from_numpy_and_from_torch(tmp_path):
    out = moec.compile("zoo:mixtral-lm", target="torch", dtype="bf16", output=tmp_path / "a")
    ids = np.random.default_rng(0).integers(0, 256, (2, 5))
    with moec.load(out.path) as runner:
        as_numpy = runner(ids)
        as_torch = runner(torch.from_numpy(ids))
    assert as_numpy.dtype.name == "bfloat16" and as_torch.dtype == torch.bfloat16
    np.testing.assert_array_equal(as_numpy.astype(np.float32), as_torch.float().numpy())


def test_routers_stay_float32(tmp_path):
    out = moec.compile("zoo:deepseek-lm", target="torch", dtype="fp16", output=tmp_path / "a")
    weights = torch.export.load(out.path / "model.pt2").state_dict
    moe = {k.rsplit(".", 1)[-1]: v.dtype for k, v in weights.items() if ".moe." in k}
    assert moe["router_weight"] == moe["selection_bias"] == torch.float32
    assert moe["w_up"] == moe["w_down"] == moe["shared_up"] == torch.float16


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_a_dtype_the_runtime_cannot_run_is_refused_at_compile_time(tmp_path, target):
    with pytest.raises(SettingsError, match="no bfloat16 kernels; it can run fp32, fp16"):
        moec.compile("zoo:mixtral", target=target, dtype="bf16", output=tmp_path / "a")
    result = run_cli(
        "compile", "zoo:mixtral", "-t", target, "--dtype", "bf16", "-o", tmp_path / "b"
    )
    assert result.exit_code == 2 and "ONNX Runtime on CPU" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
