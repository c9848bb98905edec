"""Running artifacts: manifest reading, runners per backend, comparison of outputs.

Imports nothing from `moec.compiler` or `moec.passes` (only `moec.ir` and the torch-free base
modules): a deployed artifact needs only this package and its backend, and an ONNX artifact's
runtime imports no torch.
"""

from __future__ import annotations

from moec.runtime.load import load
from moec.runtime.manifest import Manifest
from moec.runtime.runner import Runner

__all__ = ["Manifest", "Runner", "load"]
