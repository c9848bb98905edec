"""Reproducible compiles: the default lowering is a rule, not a timing, so the same source and
settings give byte-identical files, even in another process with another hash seed; timing on
the host is opt-in (``--autotune``), cached on disk, and chooses what it measured fastest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import moec
from moec.cli import main
from moec.compiler import autotune


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def artifact_bytes(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("target", ["ort", "torch"])
def test_same_source_and_settings_give_byte_identical_files(tmp_path, target):
    here = moec.compile("zoo:deepseek-lm", target=target, output=tmp_path / "a")
    code = (
        "import moec; "
        f"moec.compile('zoo:deepseek-lm', target={target!r}, output={str(tmp_path / 'b')!r})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first, second = artifact_bytes(here.path), artifact_bytes(tmp_path / "b")
    assert list(first) == list(second) and len(first) >= 2
    for name in first:
        assert first[name] == second[name], f"{name} differs between the two compiles"


def fake_measure(winner: str, calls: list):
    """`measure_lowerings` that says ``winner`` is twice as fast at every size."""

    def measure(spec, present, lowerings, target, *args, **kwargs):
        calls.append(list(lowerings))
        return {name: [1.0 if name == winner else 2.0] * 3 for name in lowerings}

    return measure


@pytest.mark.parametrize("winner", ["kernel", "grouped_mm"])
def test_autotune_keeps_what_it_measured_fastest_and_caches_it(
    tmp_path, monkeypatch, cache_dir, winner
):
    calls: list = []
    monkeypatch.setattr(autotune, "measure_lowerings", fake_measure(winner, calls))
    first = moec.compile("zoo:mixtral", target="torch", autotune=True, output=tmp_path / "a")
    assert calls == [["kernel", "grouped_mm"]]
    (block,) = first.blocks
    assert block.lowering == winner
    assert block.reason.startswith("fastest on this host (timed;")
    cached = json.loads((cache_dir / "autotune.json").read_text())
    (entry,) = cached.values()
    assert entry["target"] == "torch" and entry["cpu"] and entry["threads"] >= 1
    second = moec.compile("zoo:mixtral", target="torch", autotune=True, output=tmp_path / "b")
    assert len(calls) == 1  # the second compile timed nothing
    assert second.blocks[0].lowering == winner
    assert "(cached timing;" in second.blocks[0].reason
    assert first.manifest.settings["autotune"] is True


def test_autotune_really_times_and_chooses_the_fastest(tmp_path, cache_dir):
    result = moec.compile("zoo:mixtral", target="ort", autotune=True, output=tmp_path / "a")
    (record,) = [p for p in result.manifest.passes if p["name"] == "grouped-gemm"]
    (timing,) = record["report"]["timings"].values()
    assert timing["cached"] is False
    relative = timing["relative_time"]
    assert result.blocks[0].lowering == min(relative, key=relative.get)
    (entry,) = json.loads((cache_dir / "autotune.json").read_text()).values()
    seconds = entry["seconds"]
    assert sorted(seconds) == ["fused", "gather"]
    assert all(len(s) == 3 and all(0 < t < 1 for t in s) for s in seconds.values())
    assert moec.verify(result.path)


def test_a_damaged_or_unwritable_cache_is_not_an_error(tmp_path, monkeypatch, cache_dir):
    calls: list = []
    monkeypatch.setattr(autotune, "measure_lowerings", fake_measure("kernel", calls))
    cache_dir.mkdir()
    (cache_dir / "autotune.json").write_text("{not json")
    moec.compile("zoo:mixtral", target="torch", autotune=True, output=tmp_path / "a")
    key = next(iter(json.loads((cache_dir / "autotune.json").read_text())))
    (cache_dir / "autotune.json").write_text(json.dumps({key: {"seconds": {"kernel": "x"}}}))
    moec.compile("zoo:mixtral", target="torch", autotune=True, output=tmp_path / "b")
    assert len(calls) == 2  # the damaged entry was measured again
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "a" / "manifest.json" / "below-a-file"))
    result = moec.compile("zoo:mixtral", target="torch", autotune=True, output=tmp_path / "c")
    assert result.blocks[0].lowering == "kernel" and len(calls) == 3


def test_autotune_cannot_be_combined_with_a_forced_lowering(tmp_path):
    result = CliRunner().invoke(
        main,
        ["compile", "zoo:mixtral", "--autotune", "--lowering", "gather", "-o", str(tmp_path / "a")],
    )
    assert result.exit_code == 2
    assert "--autotune times the target's default candidates" in result.output
