"""Writing an artifact directory so that nothing is ever half-written or lost.

Files go to a temporary sibling of OUT, the manifest (with each file's size and sha256) last;
only then is the directory renamed into place. An existing OUT is replaced only with ``force``
and only if it is a moec artifact (or empty), so ``-o ~ --force`` cannot delete a home directory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from moec.errors import ArtifactError
from moec.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest, file_sha256

__all__ = ["check_destination", "write_artifact"]


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


def write_artifact(
    out: Path,
    manifest: Manifest,
    write_files: Callable[[Path], dict[str, str]],
    force: bool = False,
) -> Path:
    """Create ``out``: ``write_files(tmp_dir)`` writes the files and returns role -> file name."""
    out = Path(out).absolute()
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        roles = write_files(tmp)
        manifest.files = {
            role: FileEntry(name, (tmp / name).stat().st_size, file_sha256(tmp / name))
            for role, name in roles.items()
        }
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    check_destination(out, force)  # it may have appeared while we worked
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(trash / out.name)
    try:
        tmp.rename(out)
    except BaseException:
        (trash / out.name).rename(out)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
