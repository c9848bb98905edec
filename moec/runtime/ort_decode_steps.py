"""Decode steps on ONNX Runtime's CPU provider, the cache in buffers allocated once (IO binding).

Each layer's present key and value are written by ONNX Runtime straight into one of two
buffers sized for the whole generation (batch x kv heads x total x dim); the next step reads
them there as its past while writing into the other. So no step allocates or copies anything
for the cache outside the graph: what grows with the sequence lives in those buffers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BoundDecodeSteps", "can_bind"]


def can_bind(runner) -> bool:
    """Whether ``runner``'s session runs on the CPU with caches numpy can hold."""
    if runner.session.get_providers()[0] != "CPUExecutionProvider":
        return False
    specs = {t.name: t.dtype for t in runner.manifest.outputs}
    return all(_numpy_dtype(specs[n]) is not None for n in runner.decoding.present_names)


class BoundDecodeSteps:
    """``steps(feeds) -> outputs`` for `generate`: feeds as `Decoding.next_step` builds them
    (the first with an empty past), sequences of at most ``total`` tokens."""

    def __init__(self, runner, batch: int, total: int):
        self.runner, self.session = runner, runner.session
        self.binding = self.session.io_binding()
        dtypes = {t.name: t.dtype for t in runner.manifest.outputs}
        self.buffers: dict[str, tuple[list[np.ndarray], tuple[int, int, int]]] = {}
        for layer in runner.decoding.layers:
            for name, dim in (
                (layer.present_key, layer.key_dim),
                (layer.present_value, layer.value_dim),
            ):
                dtype, size = _numpy_dtype(dtypes[name]), batch * layer.kv_heads * total * dim
                pair = [np.empty(size, dtype), np.empty(size, dtype)]
                self.buffers[name] = (pair, (batch, layer.kv_heads, dim))
        self.others = [n for n in runner.output_names if n not in self.buffers]
        self.step = 0

    def __call__(self, feeds: dict) -> dict[str, np.ndarray]:
        arrays = self.runner.checked_feeds(feeds)
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in arrays.items():
            binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        past = arrays[self.runner.decoding.layers[0].past_key].shape[2]
        length = past + arrays["input_ids"].shape[1]
        outputs: dict[str, np.ndarray] = {}
        for name, (pair, (batch, heads, dim)) in self.buffers.items():
            present = pair[self.step % 2][: batch * heads * length * dim]
            present = present.reshape(batch, heads, length, dim)
            binding.bind_output(name, "cpu", 0, present.dtype, present.shape, present.ctypes.data)
            outputs[name] = present
        for name in self.others:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()[len(self.buffers) :]
        for name, value in zip(self.others, values, strict=True):
            outputs[name] = value.numpy()
        self.step += 1
        return outputs


def _numpy_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and the float8 types: numpy has none
        return None
