"""``load(OUT)``: read and validate an artifact, return an active runner for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moec import registry
from moec.errors import TargetNotBuiltError
from moec.runtime.manifest import Manifest
from moec.runtime.runner import Runner

__all__ = ["load"]


def load(path: str | Path, *, trust_pickle: bool = False, **runner_options: Any) -> Runner:
    """An activated runner for the artifact at ``path``: the runner its target registered.

    ``trust_pickle``: the artifact's files may be loaded by unpickling, which runs code (a
    ``.pt2`` that needs it is refused otherwise). ``runner_options`` go to the backend's
    runner (ONNX Runtime: ``providers``, ``intra_op_threads``; torch: ``threads``, ``pack``).
    """
    manifest = Manifest.read(path)
    target = registry.target(manifest.target)
    if target.runner is None:
        raise TargetNotBuiltError(
            f"{path} is a {target.name!r} artifact, which this version of moec cannot run"
        )
    runner = target.runner_class()(
        manifest, Path(path), trust_pickle=trust_pickle, **runner_options
    )
    return runner.activate()
