"""The compiler: loading sources, capture (torch.export), the lowerings and target writers the
registry names, ``--autotune``, and artifact writing."""

from __future__ import annotations

from moec.compiler.artifact_writer import write_artifact
from moec.compiler.capture import capture
from moec.compiler.sources import load_source

__all__ = ["capture", "load_source", "write_artifact"]
