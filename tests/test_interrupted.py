"""Interrupted compiles: ``kill -9`` at any point leaves no OUT or a complete one (the old or
the new artifact with ``--force``), SIGTERM cleans up at once, the next compile of OUT removes
what a killed one left, nothing is left in the system's temp directory, and two compiles to
one OUT: the second fails at once."""

from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moec
from moec.runtime.manifest import Manifest

SOURCE = "zoo:mixtral-lm"


PROGRESS = re.compile(r"\[\d+/\d+\] ")  # moec compile's progress lines in a pipe


def start(out: Path, tmpdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    command = [sys.executable, "-m", "moec.cli", "compile", SOURCE, "-o", str(out), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def system_temp_leftovers(tmpdir: Path) -> list[str]:
    """What a compile left in $TMPDIR but the two things its libraries keep there whoever uses
    them, killed or not: onnxruntime's session id file ``.ses`` (written on import) and torch's
    empty inductor cache folder ``torchinductor_USER``."""
    kept = (".ses", f"torchinductor_{getpass.getuser()}")
    return sorted(p.name for p in tmpdir.iterdir() if p.name not in kept)


def staged_file(out: Path, name: str) -> bool:
    return any((p / name).exists() for p in out.parent.glob(f".{out.name}.tmp-*"))


# when to kill, as a condition on what the compile has made so far
POINTS = {
    "lock taken": lambda out: (out.parent / f".{out.name}.lock").exists(),
    "staging made": lambda out: any(out.parent.glob(f".{out.name}.tmp-*")),
    "model written": lambda out: staged_file(out, "model.onnx"),
    "weights written": lambda out: staged_file(out, "model.onnx.data"),
    "manifest written": lambda out: staged_file(out, "manifest.json"),
}


def kill_when(process: subprocess.Popen, out: Path, point: str, sig=signal.SIGKILL) -> bool:
    """Send ``sig`` once ``point`` holds (True), or False if the compile ended first."""
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if POINTS[point](out):
            process.send_signal(sig)
            process.wait()
            return True
        time.sleep(0.0005)
    process.wait()
    return False


def assert_complete_or_absent(out: Path) -> str | None:
    if not out.exists():
        return None
    manifest = Manifest.read(out)  # every file present, sizes and hashes as listed
    return manifest.files["model"].sha256


@pytest.mark.parametrize("force", [False, True], ids=["new", "replacing"])
def test_kill_9_at_any_point_leaves_no_or_a_complete_artifact(tmp_path, force):
    out, tmpdir = tmp_path / "out", tmp_path / "systmp"
    tmpdir.mkdir()
    if force:
        old = moec.compile("zoo:qwen-moe-lm", output=out).path
        old_model = Manifest.read(old).files["model"].sha256
    killed = []
    for point in POINTS:
        process = start(out, tmpdir, *(["--force"] if force else []))
        killed.append(kill_when(process, out, point))
        model = assert_complete_or_absent(out)
        if force:
            assert model is not None  # never a moment without an artifact at OUT
        if model is None or (force and model == old_model):
            continue
        assert moec.load(out)  # the new one, complete
    assert sum(killed) >= 3, killed  # most points were reached before the compile ended
    done = start(out, tmpdir, "--force")
    assert done.wait() == 0, done.stderr.read().decode()
    assert leftovers(out) == [] and system_temp_leftovers(tmpdir) == []


def test_sigterm_cleans_up_at_once(tmp_path):
    out, tmpdir = tmp_path / "out", tmp_path / "systmp"
    tmpdir.mkdir()
    process = start(out, tmpdir)
    assert kill_when(process, out, "model written", signal.SIGTERM)
    assert process.returncode != 0
    assert not out.exists() and leftovers(out) == [] and system_temp_leftovers(tmpdir) == []


def test_a_second_compile_to_the_same_out_fails_at_once(tmp_path):
    out, tmpdir = tmp_path / "out", tmp_path / "systmp"
    tmpdir.mkdir()
    first = start(out, tmpdir, "--autotune")  # timing makes it the slower one
    deadline = time.monotonic() + 60
    while not POINTS["lock taken"](out) and time.monotonic() < deadline:
        time.sleep(0.01)
    second = start(out, tmpdir)
    started = time.monotonic()
    _, err = second.communicate()
    assert second.returncode == 2
    assert "is being written by another moec compile" in err.decode()
    assert first.poll() is None or time.monotonic() - started < 30  # it did not wait
    assert first.wait() == 0
    assert Manifest.read(out) and leftovers(out) == [] and system_temp_leftovers(tmpdir) == []


def test_an_artifact_left_aside_is_put_back(tmp_path):
    """Where the system cannot exchange two directories, --force moves OUT aside first: a
    compile killed between its two renames leaves OUT missing, and the next one restores it."""
    out = moec.compile("zoo:mixtral", output=tmp_path / "out").path
    aside = tmp_path / ".out.old-12345-abc"
    out.rename(aside)
    (tmp_path / ".out.tmp-12345-def").mkdir()  # a staging directory a killed compile left
    with pytest.raises(moec.MoecError, match="already exists"):
        moec.compile("zoo:mixtral", output=out)  # restored first, so not replaced without force
    assert Manifest.read(out) and leftovers(out) == []


def test_a_compile_out_of_memory_says_so_and_leaves_nothing(tmp_path):
    """Under an address-space limit a little above what the imports take, the 800 MB model
    cannot be built: one clear line, exit 2, nothing left beside OUT."""
    import resource

    imports = "import moec.pipeline, moec.cli; print(open('/proc/self/status').read())"
    status = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True)
    vm_kb = next(int(line.split()[1]) for line in status.stdout.splitlines() if "VmSize" in line)
    limit = (vm_kb + 400_000) * 1024

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = tmp_path / "out"
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": tests, "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "moec.cli", "compile", "factories:big_mixtral_block"]
    done = subprocess.run(
        [*command, "-o", str(out)], env=env, preexec_fn=cap, capture_output=True, text=True
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    lines = [line for line in lines if not PROGRESS.match(line)]  # [1/5] load (0.4 s)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory in the "), lines
    assert not out.exists() and leftovers(out) == []


def test_an_artifact_has_the_modes_of_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        out = moec.compile("zoo:mixtral", output=tmp_path / "out").path
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}
