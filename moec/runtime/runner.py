"""`Runner`: one interface over every backend (after Polygraphy's runners).

A runner is a context manager: ``activate`` builds the backend session, ``infer(feeds)`` checks
the feeds against the manifest and calls the backend's ``infer_impl``, ``deactivate`` frees it.
Calling a runner, ``m(input_ids)``, activates it if needed and returns the main output(s):
torch tensors in give torch tensors out, numpy arrays in give numpy arrays out.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import InputError, UsageError
from moec.ir.signature import DynamicDim, TensorSpec
from moec.runtime.arrays import is_torch, to_numpy, to_torch
from moec.runtime.manifest import Manifest

__all__ = ["Runner", "check_feeds", "feed_layout"]

MAX_VALID_LAYOUTS = 1024  # layouts a runner remembers as checked; later ones are checked each call


class Runner(abc.ABC):
    def __init__(self, manifest: Manifest, directory: Path, trust_pickle: bool = False):
        """``trust_pickle``: the artifact's files may be loaded by unpickling (runs code)."""
        self.manifest = manifest
        self.directory = Path(directory)
        self.trust_pickle = trust_pickle
        self.is_active = False
        self.inference_time: float | None = None  # seconds taken by the last infer_impl
        self.input_names = [t.name for t in manifest.inputs]
        self.main_output_names = [t.name for t in manifest.main_outputs]
        self.ranged_inputs = [t for t in manifest.inputs if t.value_range is not None]
        self.mask_inputs = [t for t in manifest.inputs if t.role == "mask"]
        self.valid_layouts: set[tuple] = set()  # of feeds `check_feeds` passed (`feed_layout`)
        self.decoding = manifest.cache  # the KV cache, if the artifact has one

    # -- lifecycle ----------------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- running ------------------------------------------------------------------------------
    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run on ``feeds`` (name -> array or tensor); returns every output by name."""
        if not self.is_active:
            raise UsageError(f"{type(self).__name__} is not active; use it in a with-block")
        as_torch = any(is_torch(v) for v in feeds.values())
        feeds = self.completed(feeds)
        arrays = self.checked_feeds(feeds)
        start = time.perf_counter()
        outputs = self.infer_impl(arrays)
        self.inference_time = time.perf_counter() - start
        if as_torch:
            return {k: to_torch(np.ascontiguousarray(v)) for k, v in outputs.items()}
        return outputs

    def completed(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """``feeds`` with the inputs a caller may leave out filled in: a cache artifact's mask,
        positions and past (`Decoding.complete`), another's attention mask."""
        if self.decoding is not None:
            return self.decoding.complete(feeds, self.manifest.inputs)
        return self._with_default_masks(feeds)

    def _with_default_masks(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """``feeds`` with an omitted attention mask of the tokens' shape all ones, as
        transformers takes a missing one."""
        shape = getattr(feeds.get("input_ids"), "shape", None)
        missing = [s for s in self.mask_inputs if s.name not in feeds]
        if shape is None or not missing:
            return feeds
        done = dict(feeds)
        for spec in missing:
            if spec.rank == len(shape):
                done[spec.name] = np.ones(tuple(shape), dtype=spec.dtype)
        return done

    def checked_feeds(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """`check_feeds`, whose checks of names, dtypes and shapes run once per layout of the
        feeds (`feed_layout`), since a runner called token by token would otherwise repeat them
        on every call. Value ranges are checked on every call."""
        layout = feed_layout(feeds)
        if layout is None or layout not in self.valid_layouts:
            arrays = check_feeds(self.manifest.inputs, feeds)
            if layout is not None and len(self.valid_layouts) < MAX_VALID_LAYOUTS:
                self.valid_layouts.add(layout)
            return arrays
        for spec in self.ranged_inputs:
            _check_values(spec, feeds[spec.name])
        return feeds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Positional inputs in the manifest's order (or by name); the main output(s)."""
        names = self.input_names
        if len(args) > len(names):
            raise InputError(f"{len(args)} inputs given; the artifact takes {len(names)}: {names}")
        feeds = dict(zip(names, args, strict=False))
        for key in kwargs:
            if key in feeds:
                raise InputError(f"input {key!r} given twice (by position and by name)")
        feeds.update(kwargs)
        self.activate()
        outputs = self.infer(feeds)
        main = [outputs[name] for name in self.main_output_names]
        return main[0] if len(main) == 1 else tuple(main)

    def generate(self, input_ids: Any, max_new_tokens: int = 20, **options: Any) -> Any:
        """The prompt followed by new tokens, as transformers' ``generate`` returns them
        (`moec.runtime.generate.generate` has the options)."""
        from moec.runtime.generate import generate

        return generate(self, input_ids, max_new_tokens, **options)

    def decode_steps(self, batch: int, total: int) -> Callable[[dict[str, Any]], dict]:
        """What runs `generate`'s steps for sequences of ``batch`` x up to ``total`` tokens:
        `infer` unless the backend keeps the cache in buffers of its own."""
        return self.infer

    # -- backend hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def activate_impl(self) -> None:
        """Create the backend session."""

    @abc.abstractmethod
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on checked numpy feeds; return every output."""

    @abc.abstractmethod
    def deactivate_impl(self) -> None:
        """Free the backend session."""


def check_feeds(
    specs: list[TensorSpec], feeds: dict[str, Any], keep_device_tensors: bool = False
) -> dict[str, np.ndarray]:
    """Numpy arrays for ``feeds`` after checking names, dtypes, ranks, sizes and value ranges.
    ``keep_device_tensors``: torch tensors on a GPU are checked where they are and kept."""
    expected = [s.name for s in specs]
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; the artifact's inputs are {expected}")
    missing = [n for n in expected if n not in feeds]
    arrays: dict[str, np.ndarray] = {}
    dims_seen: dict[str, tuple[int, str]] = {}
    for spec in specs:  # the inputs given first: what is wrong with them says most
        if spec.name not in feeds:
            continue
        value = feeds[spec.name]
        if keep_device_tensors and is_torch(value) and value.device.type != "cpu":
            arrays[spec.name] = _checked_device_tensor(spec, value, dims_seen)
            continue
        if is_torch(value):
            value = _torch_to_numpy(spec, value)
        if not isinstance(value, np.ndarray):
            raise InputError(
                f"input {spec.name!r} is a {type(value).__name__}; pass a numpy array or a "
                f"torch tensor of {spec.dtype} {spec.shape_str()}"
            )
        _check_layout(spec, value.dtype.name, value.shape, dims_seen)
        if spec.value_range is not None:
            _check_values(spec, value)
        # native byte order (a runtime reads raw bytes); ascontiguousarray would make 0-d 1-d
        arrays[spec.name] = np.asarray(value, dtype=value.dtype.newbyteorder("="), order="C")
    if missing:
        raise InputError(f"missing input(s) {missing}; the artifact's inputs are {expected}")
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, DynamicDim) and dim.sum_of:
                _check_sum(spec, axis, arrays[spec.name].shape[axis], dim, dims_seen)
    return arrays


def _checked_device_tensor(spec: TensorSpec, value: Any, dims_seen: dict) -> Any:
    """A torch tensor on a device, checked where it is."""
    _check_layout(spec, str(value.dtype).removeprefix("torch."), value.shape, dims_seen)
    if spec.value_range is not None and value.numel():
        _check_range(spec, int(value.min()), int(value.max()))
    return value


def _check_layout(spec: TensorSpec, dtype: str, shape, dims_seen: dict) -> None:
    """A feed's dtype, rank and sizes against ``spec``."""
    if dtype != spec.dtype:
        raise InputError(
            f"input {spec.name!r} has dtype {dtype}, expected {spec.dtype}: "
            f"convert it first (e.g. x.astype(np.{spec.dtype}) or x.to(torch.{spec.dtype}))"
        )
    if len(shape) != spec.rank:
        raise InputError(
            f"input {spec.name!r} has rank {len(shape)} (shape {list(shape)}), "
            f"expected rank {spec.rank}: {spec.shape_str()}"
        )
    for axis, (size, dim) in enumerate(zip(shape, spec.shape, strict=True)):
        _check_dim(spec, axis, int(size), dim, dims_seen)


def feed_layout(feeds: dict[str, Any]) -> tuple | None:
    """What `check_feeds` checks of ``feeds`` besides values, as a key (names, dtypes, shapes),
    or None unless every feed is a C-contiguous numpy array in native byte order (which it
    passes on as it is)."""
    for value in feeds.values():
        if (
            type(value) is not np.ndarray
            or not value.flags.c_contiguous
            or not value.dtype.isnative
        ):
            return None
    return tuple((name, value.dtype, value.shape) for name, value in feeds.items())


def _torch_to_numpy(spec: TensorSpec, value: Any) -> np.ndarray:
    """A torch tensor's values as numpy; a tensor without data (meta, or on a device numpy
    cannot read) is an input error."""
    if value.is_meta:
        raise InputError(
            f"input {spec.name!r} is a meta tensor, which has no values; pass a tensor with data"
        )
    try:
        return to_numpy(value.detach().cpu())
    except (RuntimeError, TypeError) as e:
        raise InputError(
            f"input {spec.name!r} ({value.dtype} on {value.device}) cannot be read as an array "
            f"({e}); pass {spec.dtype} {spec.shape_str()}"
        ) from e


def _check_values(spec: TensorSpec, value: np.ndarray) -> None:
    if value.size:
        _check_range(spec, value.min(), value.max())


def _check_range(spec: TensorSpec, least, most) -> None:
    low, high = spec.value_range
    if least < low or most >= high:
        raise InputError(
            f"input {spec.name!r} has values in [{least}, {most}], outside "
            f"the valid range [{low}, {high})"
        )


def _check_sum(spec: TensorSpec, axis: int, size: int, dim: DynamicDim, seen: dict) -> None:
    parts = [seen[name][0] for name in dim.sum_of if name in seen]
    if len(parts) == len(dim.sum_of) and size != sum(parts):
        terms = " + ".join(f"{name} {seen[name][0]}" for name in dim.sum_of)
        raise InputError(
            f"input {spec.name!r} dim {axis} ({dim.name}) is {size}, but it must be {terms} = "
            f"{sum(parts)}"
        )


def _check_dim(spec: TensorSpec, axis: int, size: int, dim, seen: dict) -> None:
    where = f"input {spec.name!r} dim {axis}"
    if isinstance(dim, int):
        if size != dim:
            raise InputError(f"{where} is {size}, expected {dim} ({spec.shape_str()})")
        return
    assert isinstance(dim, DynamicDim)
    if size < dim.min or (dim.max is not None and size > dim.max):
        bound = f"[{dim.min}, {dim.max}]" if dim.max is not None else f">= {dim.min}"
        raise InputError(f"{where} ({dim.name}) is {size}; it must be {bound}")
    if dim.name in seen and seen[dim.name][0] != size:
        other_size, other = seen[dim.name]
        raise InputError(
            f"{where} ({dim.name}) is {size} but {other} has {dim.name} = {other_size}; "
            "they must agree"
        )
    seen.setdefault(dim.name, (size, f"input {spec.name!r}"))
