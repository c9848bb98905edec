"""`TrtRunner`: runs a ``trt`` artifact's engine with TensorRT (after Polygraphy's TrtRunner).

Name-based I/O (TensorRT 10): per call, each input's shape is set (`set_input_shape`) and
its device address given; outputs whose shape is known from the inputs are allocated by
torch, the others (shapes that depend on values) by an output allocator that learns their
shape as the engine runs. Inputs may be numpy arrays or torch tensors; CUDA tensors are used
where they are, without a copy, and outputs come back as the inputs came (numpy, or torch on
the GPU). Before loading, the engine is checked against this machine: an artifact without
one, or with one built for another TensorRT or GPU, is an error that names
``moec build-engine``.

This runner has never run: TensorRT cannot be installed where moec is built and tested (see
docs/tensorrt.md). Everything before ``import tensorrt`` is tested.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import ArtifactError, RuntimeUnavailableError
from moec.runtime.arrays import is_torch, to_numpy, to_torch
from moec.runtime.manifest import Manifest
from moec.runtime.runner import Runner, check_feeds
from moec.runtime.tensorrt_env import engine_mismatch, tensorrt_missing

__all__ = ["TrtRunner", "engine_problem"]


def engine_problem(manifest: Manifest, directory: Path) -> str | None:
    """Why this machine cannot run the artifact's engine (None: it can try)."""
    rebuild = f"moec build-engine {directory}"
    if "engine" not in manifest.files:
        return (
            f"{directory} has no TensorRT engine yet: build it on the deployment machine with "
            f"`{rebuild}` (TensorRT >= 10 and an NVIDIA GPU)"
        )
    why = tensorrt_missing()
    if why is not None:
        return f"{directory}'s TensorRT engine cannot run here: {why}"
    changed = engine_mismatch(manifest.build.get("engine", {}))
    if changed is not None:
        return (
            f"{directory}'s engine was built for {changed}; rebuild it on this machine with "
            f"`{rebuild}`"
        )
    return None


class TrtRunner(Runner):
    def __init__(
        self, manifest: Manifest, directory: Path, trust_pickle: bool = False, device: int = 0
    ):
        super().__init__(manifest, directory, trust_pickle)
        self.device = device
        self.engine = self.context = self.stream = self.allocator = None

    def activate_impl(self) -> None:
        why = engine_problem(self.manifest, self.directory)
        if why is not None:
            raise RuntimeUnavailableError(why)
        import tensorrt as trt
        import torch

        path = self.directory / self.manifest.files["engine"].path
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ArtifactError(
                    f"TensorRT cannot load {path} (corrupt, or from another TensorRT version); "
                    f"rebuild it with `moec build-engine {self.directory}`"
                )
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.engine_inputs = [n for n in names if is_input[n]]
        self.engine_outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.allocator = _output_allocator(trt, torch, self.device)

    def deactivate_impl(self) -> None:
        self.engine = self.context = self.stream = self.allocator = None

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """As `Runner.infer`, but CUDA tensors in give CUDA tensors out, with no copy."""
        on_gpu = any(is_torch(v) and v.device.type == "cuda" for v in feeds.values())
        if not (on_gpu and self.is_active):
            return super().infer(feeds)
        feeds = check_feeds(self.manifest.inputs, self.completed(feeds), keep_device_tensors=True)
        start = time.perf_counter()
        outputs = self.run_tensors(feeds)
        self.inference_time = time.perf_counter() - start
        return outputs

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: to_numpy(v.cpu()) for k, v in self.run_tensors(feeds).items()}

    def run_tensors(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the engine on ``feeds`` (numpy arrays, or torch tensors: those on its GPU are
        used in place); its outputs as torch tensors on its GPU."""
        import torch

        context, device = self.context, f"cuda:{self.device}"
        kept: list = []  # alive until the engine has run
        for name in self.engine_inputs:
            value = feeds[name]
            value = to_torch(value) if isinstance(value, np.ndarray) else value  # bf16 too
            value = value.to(device=device, dtype=self.dtypes[name]).contiguous()
            kept.append(value)
            if not context.set_input_shape(name, tuple(value.shape)):
                raise ArtifactError(
                    f"input {name!r} of shape {list(value.shape)} is outside the engine's "
                    f"profile {self.manifest.build.get('inputs', {}).get(name)}; rebuild it "
                    "with wider --trt-shapes"
                )
            context.set_tensor_address(name, _address(value, kept))
        outputs: dict[str, Any] = {}
        for name in self.engine_outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # known only as the engine runs
                context.set_output_allocator(name, self.allocator)
                continue
            out = outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=device)
            context.set_tensor_address(name, _address(out, kept))
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream())
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise ArtifactError("TensorRT could not run the engine (its log above says why)")
            self.stream.synchronize()
        for name in self.engine_outputs:
            if name not in outputs:
                outputs[name] = self.allocator.tensor(name, self.dtypes[name])
        return outputs


def _address(tensor, kept: list) -> int:
    """``tensor``'s device address; for an empty one, that of a byte kept alive in ``kept``
    (TensorRT takes no null pointer)."""
    if tensor.numel() == 0:
        tensor = tensor.new_empty(1)
        kept.append(tensor)
    return tensor.data_ptr()


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int8: torch.int8,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.uint8: torch.uint8,
    }
    if trt_dtype not in table:
        raise ArtifactError(f"the engine has a tensor of type {trt_dtype}, which moec cannot read")
    return table[trt_dtype]


def _output_allocator(trt, torch, device: int):
    """An `IOutputAllocator` keeping one growing torch buffer per output."""

    class OutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, Any] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            size = max(int(size), 1)
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < size:
                buffer = torch.empty(size, dtype=torch.uint8, device=f"cuda:{device}")
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return self.reallocate_output_async(tensor_name, memory, size, alignment, 0)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

        def tensor(self, name: str, dtype):
            shape = self.shapes[name]
            count = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            return self.buffers[name][:count].view(dtype).reshape(shape).clone()

    return OutputAllocator()
