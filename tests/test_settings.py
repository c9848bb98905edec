"""`CompileSettings`: one validation for the CLI and the API, every flag that needs another
refused naming both, stored in the manifest and shown by ``moec inspect OUT``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import moec
from moec.cli import main
from moec.errors import LoweringError, SettingsError
from moec.settings import FLAGS, CompileSettings, DistillOptions, MergeOptions

NEEDY = [f for f in FLAGS if f.needs is not None]
VALUES = {"flag": True, "int": 3, "float": 0.5, "list": "a,b", "path": "x.npy", "keep": 2}


def value_of(flag):
    return flag.choices[0] if flag.kind == "choice" else VALUES[flag.kind]


@pytest.mark.parametrize("flag", NEEDY, ids=[f.option for f in NEEDY])
def test_every_flag_that_needs_another_names_both(flag):
    other = next(f for f in FLAGS if f.name == flag.needs)
    with pytest.raises(SettingsError) as info:
        CompileSettings.from_flags({flag.name: value_of(flag)})
    assert flag.option in str(info.value) and other.option in str(info.value)


@pytest.mark.parametrize(
    ("flags", "error", "message"),
    [
        ({"target": "nope"}, SettingsError, "unknown target 'nope'"),
        ({"lowering": "nope"}, LoweringError, "unknown lowering 'nope'"),
        ({"target": "torch", "lowering": "gather"}, LoweringError, "it can run: kernel"),
        ({"capacity": "lots"}, SettingsError, "--capacity-factor must be a number > 0"),
        ({"capacity_factor": 2.0, "capacity": "auto"}, SettingsError, "not both"),
        ({"autotune": True, "lowering": "gather"}, SettingsError, "--autotune times"),
        ({"calib": "x.npy"}, SettingsError, "--calib drives the lossy passes"),
        ({"merge_experts": 0.5}, SettingsError, "--merge-experts need calibration data"),
        ({"distill_dense": True, "distill_lr": 0.0, "calib": "x"}, SettingsError, "> 0"),
        ({"shards": 2}, SettingsError, "unknown compile setting(s) ['shards']"),
        ({"target": "torch", "capacity": 2.0}, LoweringError, "which target torch cannot run"),
        ({"calib_samples": "3", "calib": "x"}, SettingsError, "--calib-samples takes an integer"),
        ({"distill_dense": 1}, SettingsError, "--distill-dense takes True or False"),
    ],
)
def test_bad_settings_are_refused_in_one_place(flags, error, message):
    with pytest.raises(error) as info:
        CompileSettings.from_flags(flags)
    assert message in str(info.value)


def test_settings_round_trip_through_a_dict():
    settings = CompileSettings.from_flags(
        {
            "target": "onnx",
            "calib": "ids.npy",
            "merge_experts": 4,
            "merge_lstsq": True,
            "distill_dense": True,
            "distill_blocks": "a,b",
        }
    )
    assert settings.merge == MergeOptions(4, "hc", True)
    assert settings.distill == DistillOptions(blocks=("a", "b"))
    assert CompileSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_the_api_and_the_cli_store_the_same_settings(tmp_path):
    api = moec.compile("zoo:mixtral", target="onnx", capacity=2.0, output=tmp_path / "api")
    cli = CliRunner().invoke(
        main,
        [
            "compile",
            "zoo:mixtral",
            "-t",
            "onnx",
            "--capacity-factor",
            "2",
            "-o",
            str(tmp_path / "cli"),
        ],
    )
    assert cli.exit_code == 0, cli.output
    stored = json.loads((tmp_path / "cli" / "manifest.json").read_text())["settings"]
    assert stored == api.manifest.settings
    assert stored["capacity"] == 2.0 and stored["target"] == "onnx"
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "cli")])
    assert shown.exit_code == 0, shown.output
    assert "compiled with" in shown.output and "--capacity-factor" in shown.output
    assert "2.0" in shown.output
