"""Writing an artifact directory so that nothing is ever half-written or lost.

`claim(out, force)` is held for a whole compile: it takes a lock on OUT (a second compile to the
same OUT fails at once instead of after all its work), removes what earlier, killed compiles of
OUT left beside it, turns SIGTERM into a clean exit, and gives a staging directory beside OUT
for the artifact's files and any scratch work (nothing goes to the system's temp directory).
`write_artifact` writes the files there, the manifest (each file's size and sha256) last, and
only then puts the directory in place: renamed to OUT, or exchanged with an existing OUT in one
atomic step (Linux's ``renameat2(RENAME_EXCHANGE)``), so that at every instant OUT is either
the old artifact or the new one. An existing OUT is replaced only with ``force`` and only if it
is a moec artifact (or empty), so ``-o ~ --force`` cannot delete a home directory.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moec.errors import ArtifactError
from moec.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest, file_sha256

__all__ = ["Claim", "check_destination", "claim", "scratch_dir", "write_artifact"]

RENAME_EXCHANGE = 2  # linux/fs.h
_SCRATCH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("scratch", default=None)


@dataclass
class Claim:
    """A compile's hold on OUT: its staging directory and scratch space beside OUT."""

    out: Path
    staging: Path
    scratch: Path


def check_destination(out: Path, force: bool) -> None:
    """Raise unless ``out`` may be written (absent, or replaceable with ``force``)."""
    if not out.exists():
        return
    if not force:
        raise ArtifactError(f"{out} already exists; pass --force (force=True) to replace it")
    is_artifact = out.is_dir() and (out / MANIFEST_NAME).is_file()
    is_empty = out.is_dir() and not any(out.iterdir())
    if not (is_artifact or is_empty):
        raise ArtifactError(
            f"{out} exists and is not a moec artifact; moec only replaces artifacts, even with "
            "--force: choose another output directory"
        )


def scratch_dir() -> Path | None:
    """The running compile's scratch directory (beside OUT), or None outside a compile."""
    return _SCRATCH.get()


@contextlib.contextmanager
def claim(out: Path, force: bool) -> Iterator[Claim]:
    """Hold OUT for one compile (see the module docstring); everything it created beside OUT
    but the artifact itself is gone when it exits, however it exits."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out), _sigterm_as_exit():
        _recover_and_clean(out)
        check_destination(out, force)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        scratch = staging / ".scratch"
        scratch.mkdir()
        token = _SCRATCH.set(scratch)
        try:
            yield Claim(out, staging, scratch)
        finally:
            _SCRATCH.reset(token)
            shutil.rmtree(staging, ignore_errors=True)


def write_artifact(
    held: Claim,
    manifest: Manifest,
    write_files: Callable[[Path], dict[str, str]],
    force: bool = False,
) -> Path:
    """Create ``held.out``: ``write_files(dir)`` writes the files and returns role -> name."""
    out, staging = held.out, held.staging
    shutil.rmtree(held.scratch, ignore_errors=True)
    try:
        roles = write_files(staging)
        manifest.files = {
            role: FileEntry(name, (staging / name).stat().st_size, file_sha256(staging / name))
            for role, name in roles.items()
        }
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        written = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        raise ArtifactError(
            f"the disk filled while writing the artifact for {out} ({full}, after "
            f"{written / 1e9:.2f} GB); nothing was left behind: free space in {out.parent}, or "
            "give -o a directory on a larger disk"
        ) from e
    _with_umask_modes(staging)
    check_destination(out, force)
    if not out.exists():
        staging.rename(out)
    elif not _exchange(staging, out):
        _replace_in_two_steps(staging, out)
    return out  # `claim` removes the staging path, which now holds the old artifact if any


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _disk_full(error: BaseException) -> str | None:
    """What the OS said when the disk (or the user's quota or file-size limit) was full, if
    that is what ``error`` comes from (writers wrap it in their own errors; numpy's ``tofile``
    says "problem writing element" and gives no errno)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            if error.errno in DISK_FULL:
                return error.strerror
            if error.errno is None and str(error).startswith("problem writing"):
                return str(error)
        error = error.__cause__ or error.__context__
    return None


def _with_umask_modes(directory: Path) -> None:
    """Give the artifact the modes the user's umask gives new files and directories
    (mkdtemp made its directory 0700, and temporary files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot (then nothing happened)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace_in_two_steps(staging: Path, out: Path) -> None:
    """OUT moved aside, the new one moved in: the old one stays beside OUT as ``.OUT.old-*``
    until the new one is in place, and a later compile puts it back if this one dies between
    the two renames (`_recover_and_clean`)."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    old.rename(staging)  # `claim` removes it


def _recover_and_clean(out: Path) -> None:
    """Put back an artifact a killed compile left aside (OUT missing, ``.OUT.old-*`` complete),
    then remove every staging and aside directory of OUT: this compile holds OUT's lock, so no
    other compile is using them."""
    prefix = f".{out.name}."
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    aside = [p for p in leftovers if p.name.startswith(prefix + "old-")]
    if not out.exists():
        complete = [p for p in aside if (p / MANIFEST_NAME).is_file()]
        if complete:
            newest = max(complete, key=lambda p: p.stat().st_mtime)
            newest.rename(out)
            leftovers.remove(newest)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """An exclusive lock on OUT for this process (a lock file beside it), or `ArtifactError`
    at once when another compile holds it."""
    import fcntl

    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ArtifactError(
                f"{out} is being written by another moec compile (process {holder}); wait for "
                "it to finish, or choose another output directory"
            ) from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break  # the file we locked is still the lock file (not one unlinked meanwhile)
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit in the main thread, so cleanup runs as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
