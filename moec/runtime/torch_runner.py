"""`TorchRunner`: runs ``torch`` artifacts, a ``model.pt2`` ExportedProgram whose MoE blocks are
``moec::moe`` nodes executed by moec's kernel (importing `moec.ir` registers the op).

On activation the program's GEMM weights (MoE experts, linear layers) are packed once for
oneDNN (`pack_weights`); ``pack=False`` runs the stored program as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import moec.ir  # noqa: F401  (registers torch.ops.moec.moe, which the program calls)
from moec.errors import ArtifactError
from moec.runtime.manifest import Manifest
from moec.runtime.runner import Runner
from moec.runtime.weight_packing import PackingReport, pack_weights

__all__ = ["TorchRunner", "prepare_program"]


class TorchRunner(Runner):
    def __init__(
        self, manifest: Manifest, directory: Path, threads: int | None = None, pack: bool = True
    ):
        super().__init__(manifest, directory)
        self.threads, self.pack = threads, pack
        self.module = None
        self.packing = PackingReport()

    def activate_impl(self) -> None:
        path = self.directory / self.manifest.files["model"].path
        try:
            self.module = torch.export.load(path).module()
        except Exception as e:  # torch raises many types for a bad archive
            hint = ""
            if "moec" in str(e):
                hint = " (its moec::moe op is registered by importing moec; load it with moec.load)"
            raise ArtifactError(f"torch cannot load {path}: {e}{hint}") from e
        if self.threads is not None:  # first: packing measures GEMMs with these threads
            torch.set_num_threads(self.threads)
        self.packing = prepare_program(self.module, self.pack)

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(feeds[spec.name]) for spec in self.manifest.inputs]
        with torch.no_grad():
            values = self.module(*args)
        values = values if isinstance(values, (tuple, list)) else (values,)
        names = [spec.name for spec in self.manifest.outputs]
        return {name: v.numpy() for name, v in zip(names, values, strict=True)}

    def deactivate_impl(self) -> None:
        self.module = None


def prepare_program(module: torch.fx.GraphModule, pack: bool = True) -> PackingReport:
    """Ready a loaded program (``ExportedProgram.module()``) to run as `TorchRunner` runs it:
    weights packed (`pack_weights`) unless ``pack`` is false, and no per-call pytree check.

    The runner hands the program a flat tuple of tensors in the manifest's order, checked
    against the manifest first (`check_feeds`), so the exported module's pre-hook that flattens
    them again to compare pytree structures on every call (0.14 ms measured, a twentieth of a
    DeepSeek-like layer at one token) has nothing left to find; the program's own shape guards
    (its _guards_fn node) still run."""
    module.validate_inputs = False
    return pack_weights(module) if pack else PackingReport()
