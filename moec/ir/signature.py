"""A program's signature: its inputs and outputs as names, dtypes and shapes (`TensorSpec`),
some dims varying between calls (`DynamicDim`). Plain data without torch: captured programs and
artifact manifests both carry it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moec.errors import ArtifactError

__all__ = ["DTYPES", "DynamicDim", "TensorSpec", "require"]

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")
ROLES = ("main", "routing", "mask", "cache")


@dataclass(frozen=True)
class DynamicDim:
    """A dimension that varies between calls, within [min, max] (max None: unbounded); one
    with ``sum_of`` is the sum of those dims (an attention mask over past and new tokens)."""

    name: str
    min: int = 1
    max: int | None = None
    sum_of: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype (numpy name), shape (ints and `DynamicDim`s).

    ``role`` is ``main`` for the model's own inputs and outputs, ``routing`` for the
    per-block routing masks, ``mask`` for an attention mask (0 or 1; verification draws ones)
    and ``cache`` for the KV cache's inputs and outputs (`moec.models.kv_cache`); ``block``
    names the MoE block a routing output belongs to; ``value_range`` is the half-open range
    [low, high) of valid values of an integer input.
    """

    name: str
    dtype: str
    shape: tuple[int | DynamicDim, ...]
    role: str = "main"
    block: str | None = None
    value_range: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)

    def shape_str(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = [d if isinstance(d, int) else _dim_dict(d) for d in self.shape]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """The spec `to_dict` wrote (checked against the manifest's schema first)."""
        shape = tuple(
            d
            if isinstance(d, int)
            else DynamicDim(d["name"], d.get("min", 1), d.get("max"), tuple(d.get("sum_of", ())))
            for d in data["shape"]
        )
        value_range = data.get("value_range")
        return cls(
            data["name"],
            data["dtype"],
            shape,
            data.get("role", "main"),
            data.get("block"),
            None if value_range is None else (int(value_range[0]), int(value_range[1])),
        )


def _dim_dict(dim: DynamicDim) -> dict[str, Any]:
    data = asdict(dim)
    if not dim.sum_of:
        del data["sum_of"]
    else:
        data["sum_of"] = list(dim.sum_of)
    return data


def require(condition: bool, where: str, what: str) -> None:
    """Raise `ArtifactError` at ``where`` (a place in a document) unless ``condition``."""
    if not condition:
        raise ArtifactError(f"{where}: {what}")
