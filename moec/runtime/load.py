"""``load(OUT)``: read and validate an artifact, return an active runner for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moec.errors import TargetNotBuiltError
from moec.runtime.manifest import Manifest
from moec.runtime.ort_runner import OrtRunner
from moec.runtime.runner import Runner

__all__ = ["load"]


def load(path: str | Path, **runner_options: Any) -> Runner:
    """An activated runner for the artifact at ``path``.

    ``runner_options`` go to the backend's runner (ONNX Runtime: ``providers``,
    ``intra_op_threads``; torch: ``threads``, ``pack``).
    """
    manifest = Manifest.read(path)
    if manifest.target in ("ort", "onnx"):
        return OrtRunner(manifest, Path(path), **runner_options).activate()
    if manifest.target == "torch":
        from moec.runtime.torch_runner import TorchRunner

        return TorchRunner(manifest, Path(path), **runner_options).activate()
    raise TargetNotBuiltError(
        f"{path} is a {manifest.target!r} artifact, which this version of moec cannot run"
    )
