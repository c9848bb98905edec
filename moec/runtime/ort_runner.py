"""`OrtRunner`: runs ``ort`` and ``onnx`` artifacts on ONNX Runtime (CUDA first when present)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moec.errors import ArtifactError
from moec.runtime.manifest import Manifest
from moec.runtime.ort_decode_steps import BoundDecodeSteps, can_bind
from moec.runtime.runner import Runner

__all__ = ["OrtRunner", "check_external_data", "session_options"]

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

        options = session_options(self.intra_op_threads)
        path = self.directory / self.manifest.files["model"].path
        check_external_data(path, {f.path for f in self.manifest.files.values()})
        try:
            self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))

    def decode_steps(self, batch: int, total: int):
        """Steps whose cache ONNX Runtime writes into buffers allocated once
        (`BoundDecodeSteps`), on the CPU provider; `infer` elsewhere."""
        self.activate()
        if not can_bind(self):
            return self.infer
        return BoundDecodeSteps(self, batch, total)

    def deactivate_impl(self) -> None:
        self.session = None


# ORT fuses a blocked int4 DequantizeLinear and its MatMul into MatMulNBits, by default
# quantising the activations to int8 (accuracy level 4); level 1 keeps them float32
QDQ_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")


def session_options(intra_op_threads: int | None):
    """ONNX Runtime session options of moec's runners."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry(*QDQ_ACCURACY)
    return options


def check_external_data(model_path: Path, listed: set[str]) -> None:
    """Raise `ArtifactError` unless every file ``model_path`` reads its tensors from is one of
    ``listed`` (the manifest's files, whose sizes and hashes were checked) and every tensor lies
    inside its file: ONNX Runtime would read whatever the graph names."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise ArtifactError(f"{model_path} is not a readable ONNX model ({e})") from e
    sizes: dict[str, int] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if location not in listed:
            raise ArtifactError(
                f"{model_path.name} reads tensor {tensor.name!r} from {location!r}, a file the "
                "manifest does not list and moec has not checked; compile the artifact again"
            )
        if location not in sizes:
            sizes[location] = (model_path.parent / location).stat().st_size
        try:
            offset = int(info.get("offset", 0))
            end = offset + int(info.get("length", sizes[location] - offset))
        except ValueError:
            offset = end = -1
        size = _nbytes(tensor.data_type, math.prod(tensor.dims))
        if not 0 <= offset <= end <= sizes[location] or end - offset != size:
            raise ArtifactError(
                f"{model_path.name}: tensor {tensor.name!r} (shape {list(tensor.dims)}, "
                f"{size} bytes) does not lie within {location} (offset {info.get('offset')}, "
                f"length {info.get('length')}, file {sizes[location]} bytes); compile the "
                "artifact again"
            )


def _tensors(graph):
    """Every tensor a graph holds: initializers, sparse ones, constants in node attributes,
    and those of subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _nbytes(data_type: int, count: int) -> int:
    """Bytes of ``count`` elements of an ONNX data type (4-bit types pack two in a byte)."""
    import onnx

    packed = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1}
    if data_type in packed:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
