"""Seeded random inputs for an artifact's (or a captured program's) declared inputs."""

from __future__ import annotations

import math

import numpy as np

from moec.errors import ArtifactError
from moec.ir.signature import DynamicDim, TensorSpec
from moec.runtime.arrays import numpy_dtype

__all__ = ["MAX_ELEMENTS", "dim_values", "make_inputs"]

MAX_ELEMENTS = 1 << 28  # of one generated input: 1 GiB of float32


def make_inputs(
    specs: list[TensorSpec], schedule: tuple[tuple[int, ...], ...], seed: int
) -> list[dict[str, np.ndarray]]:
    """One feed dict per schedule entry, with seeded random values in each input's range."""
    bounds: dict[str, tuple[int, int | None]] = {}  # a dim shared by inputs: the tightest range
    for spec in specs:
        for d in spec.shape:
            if isinstance(d, DynamicDim) and not d.sum_of:
                low, high = bounds.get(d.name, (d.min, d.max))
                highs = [h for h in (high, d.max) if h is not None]
                bounds[d.name] = (max(low, d.min), min(highs) if highs else None)
    rng = np.random.default_rng(seed)
    sets = []
    for values in schedule:
        sizes = {}
        for i, (name, (low, high)) in enumerate(bounds.items()):
            size = max(values[i] if i < len(values) else 3, low)
            sizes[name] = size if high is None else min(size, high)
        for spec in specs:
            for d in spec.shape:
                if isinstance(d, DynamicDim) and d.sum_of:
                    sizes[d.name] = sum(sizes[part] for part in d.sum_of)
        feeds = {}
        for spec in specs:
            shape = tuple(d if isinstance(d, int) else sizes[d.name] for d in spec.shape)
            if math.prod(shape) > MAX_ELEMENTS:
                raise ArtifactError(
                    f"input {spec.name!r} would need {math.prod(shape)} elements at shape "
                    f"{list(shape)}, more than moec generates ({MAX_ELEMENTS}); its declared "
                    "dims are not those of a model moec compiled"
                )
            feeds[spec.name] = _random(spec, shape, rng)
        sets.append(feeds)
    return sets


def dim_values(specs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The size each named dynamic dim has in ``feeds`` (``{"batch": 2, ...}``), in the
    order the inputs declare them."""
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.name not in feeds:
            continue
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, DynamicDim) and not dim.sum_of:
                sizes.setdefault(dim.name, int(feeds[spec.name].shape[axis]))
    return sizes


def _random(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if spec.role == "mask":  # every token attended: what the source is verified on
        return np.ones(shape, dtype=spec.dtype)
    if spec.dtype == "bool":
        return rng.random(shape) < 0.5
    if spec.dtype.startswith("int"):
        low, high = spec.value_range or (0, 2)
        return rng.integers(low, high, size=shape, dtype=spec.dtype)
    return rng.standard_normal(shape).astype(numpy_dtype(spec.dtype))
