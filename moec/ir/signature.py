"""A program's signature: its inputs and outputs as names, dtypes and shapes (`TensorSpec`),
some dims varying between calls (`DynamicDim`). Plain data without torch: captured programs and
artifact manifests both carry it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moec.errors import ArtifactError

__all__ = ["DTYPES", "DynamicDim", "TensorSpec", "require"]

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")
ROLES = ("main", "routing")


@dataclass(frozen=True)
class DynamicDim:
    """A dimension that varies between calls, within [min, max] (max None: unbounded)."""

    name: str
    min: int = 1
    max: int | None = None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype (numpy name), shape (ints and `DynamicDim`s).

    ``role`` is ``main`` for the model's own inputs and outputs and ``routing`` for the
    per-block routing masks; ``block`` names the MoE block a routing output belongs to;
    ``value_range`` is the half-open range [low, high) of valid values of an integer input.
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
        data["shape"] = [d if isinstance(d, int) else asdict(d) for d in self.shape]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """The spec `to_dict` wrote (checked against the manifest's schema first)."""
        shape = tuple(
            d if isinstance(d, int) else DynamicDim(d["name"], d.get("min", 1), d.get("max"))
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


def require(condition: bool, where: str, what: str) -> None:
    """Raise `ArtifactError` at ``where`` (a place in a document) unless ``condition``."""
    if not condition:
        raise ArtifactError(f"{where}: {what}")
