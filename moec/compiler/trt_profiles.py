"""TensorRT optimisation profiles from an artifact's dynamic dims.

An engine runs the shapes its profile spans: per input, a min, opt and max shape. moec derives
them from the manifest's named dims (``batch``, ``sequence_length``, ...): min is the dim's
least value, max its largest but at most `DEFAULT_MAX` (8 for a batch, else 2048: an engine
sized for a model's whole context is slow to build and large), opt 1 for a batch and the
largest up to `DEFAULT_OPT` for the others; a dim that is a sum (``total_sequence_length`` =
past + new) is the sum of its parts, within its own range. ``--trt-shapes NAME:MIN,OPT,MAX``
sets one dim (`moec.settings` parses it).
"""

from __future__ import annotations

from moec.errors import SettingsError
from moec.ir.signature import DynamicDim, TensorSpec

__all__ = ["DEFAULT_MAX", "DEFAULT_OPT", "input_shapes", "profile_dims"]

DEFAULT_MAX = {"batch": 8}  # the largest a default profile spans, by dim name
DEFAULT_MAX_OTHER = 2048  # ... for the other dims
DEFAULT_OPT = 128
Range = tuple[int, int, int]


def _dims(inputs: list[TensorSpec]) -> dict[str, DynamicDim]:
    found: dict[str, DynamicDim] = {}
    for spec in inputs:
        for dim in spec.shape:
            if isinstance(dim, DynamicDim):
                found.setdefault(dim.name, dim)
    return found


def profile_dims(
    inputs: list[TensorSpec], overrides: dict[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """[min, opt, max] of every named dynamic dim of ``inputs``; ``overrides`` set some (each
    must name one of them and lie in its range)."""
    dims = _dims(inputs)
    overrides = dict(overrides or {})
    for name, (low, _, high) in overrides.items():
        if name not in dims:
            where = ", ".join(sorted(dims)) or "none"
            raise SettingsError(
                f"--trt-shapes {name}: the artifact has no dynamic dim {name!r}; its dims are "
                f"{where} (moec inspect OUT shows which input has which)"
            )
        dim = dims[name]
        if low < dim.min or (dim.max is not None and high > dim.max):
            bound = f"[{dim.min}, {dim.max}]" if dim.max is not None else f">= {dim.min}"
            raise SettingsError(
                f"--trt-shapes {name}:{low},..,{high}: the artifact takes {name} in {bound}"
            )
    ranges = {name: overrides.get(name) or _default(dim) for name, dim in dims.items()}
    for name, dim in dims.items():
        if dim.sum_of and name not in overrides and all(p in ranges for p in dim.sum_of):
            parts = [ranges[p] for p in dim.sum_of]
            ranges[name] = [_clip(dim, sum(r[i] for r in parts)) for i in range(3)]
    return ranges


def _default(dim: DynamicDim) -> list[int]:
    high = DEFAULT_MAX.get(dim.name, DEFAULT_MAX_OTHER)
    high = max(high if dim.max is None else min(high, dim.max), dim.min)
    opt = max(dim.min, 1) if dim.name == "batch" else min(high, max(dim.min, DEFAULT_OPT))
    return [dim.min, min(opt, high), high]


def _clip(dim: DynamicDim, size: int) -> int:
    size = max(size, dim.min)
    return size if dim.max is None else min(size, dim.max)


def input_shapes(
    inputs: list[TensorSpec], dims: dict[str, list[int]]
) -> dict[str, list[list[int]]]:
    """Per input, its [min shape, opt shape, max shape] under the dim ranges ``dims``."""
    shapes = {}
    for spec in inputs:
        shapes[spec.name] = [
            [d if isinstance(d, int) else dims[d.name][i] for d in spec.shape] for i in range(3)
        ]
    return shapes
