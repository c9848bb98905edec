"""`OrtRunner`: runs ``ort`` and ``onnx`` artifacts on ONNX Runtime (CUDA first when present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moec.errors import ArtifactError
from moec.runtime.manifest import Manifest
from moec.runtime.runner import Runner

__all__ = ["OrtRunner"]

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class OrtRunner(Runner):
    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        trust_pickle: bool = False,
    ):
        super().__init__(manifest, directory, trust_pickle)
        self.requested_providers = providers
        self.intra_op_threads = intra_op_threads
        self.session = None

    @property
    def providers(self) -> list[str]:
        import onnxruntime as ort

        if self.requested_providers is not None:
            return list(self.requested_providers)
        available = set(ort.get_available_providers())
        return [p for p in PREFERRED_PROVIDERS if p in available]

    def activate_impl(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        path = self.directory / self.manifest.files["model"].path
        try:
            self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))

    def deactivate_impl(self) -> None:
        self.session = None
