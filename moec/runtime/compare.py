"""Comparing outputs with a reference: error statistics per output and routing agreement per block.

Statistics accumulate over several runs (input shapes): max abs, mean abs, max rel (over elements
with |ref| >= 1e-6), and relative L2 ``||out - ref|| / ||ref||`` (the worst run's). Routing
agreement is the fraction of tokens whose set of chosen experts matches the reference; tokens the
reference routed within ``NEAR_TIE`` of a different choice are counted apart and do not count
against agreement, since float rounding may legitimately flip them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["NEAR_TIE", "OutputStats", "RoutingStats", "VerifyReport"]

NEAR_TIE = 1e-4
REL_FLOOR = 1e-6


@dataclass
class OutputStats:
    """An output's errors over the runs. Within tolerance: relative L2 at most ``tolerance``,
    or, where ``atol``/``rtol`` are given, every element within ``atol + rtol * |ref|`` (as
    numpy's allclose and Polygraphy's checks)."""

    name: str
    tolerance: float  # on relative L2
    atol: float | None = None
    rtol: float | None = None
    outside: int = 0  # elements beyond atol + rtol * |ref| (when either is given)
    max_abs: float = 0.0
    max_rel: float = 0.0
    rel_l2: float = 0.0
    abs_sum: float = 0.0
    count: int = 0
    per_run: list[float] = field(default_factory=list)  # relative L2 of each run (input shape)

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / max(self.count, 1)

    @property
    def elementwise(self) -> bool:
        return self.atol is not None or self.rtol is not None

    @property
    def passed(self) -> bool:
        if self.count == 0 or not np.isfinite(self.rel_l2):
            return False
        return self.outside == 0 if self.elementwise else self.rel_l2 <= self.tolerance

    @property
    def tolerance_str(self) -> str:
        if self.elementwise:
            return f"atol {self.atol or 0:.0e} rtol {self.rtol or 0:.0e}"
        return f"{self.tolerance:.0e}"

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        if ref64.shape != out64.shape:
            raise ValueError(f"{self.name}: shape {out64.shape} != reference {ref64.shape}")
        diff = np.abs(out64 - ref64)
        if not np.all(np.isfinite(out64)):
            self.rel_l2 = float("inf")
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            big = np.abs(ref64) >= REL_FLOOR
            if big.any():
                self.max_rel = max(self.max_rel, float((diff[big] / np.abs(ref64[big])).max()))
        norm = float(np.linalg.norm(ref64))
        rel_l2 = float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff))
        self.rel_l2 = max(self.rel_l2, rel_l2)
        self.per_run.append(rel_l2)
        self.abs_sum += float(diff.sum())
        self.count += diff.size
        if self.elementwise:
            bound = (self.atol or 0.0) + (self.rtol or 0.0) * np.abs(ref64)
            self.outside += int((~(diff <= bound)).sum())


@dataclass
class RoutingStats:
    block: str
    output: str
    tolerance: float  # minimum agreement
    near_tie: float = NEAR_TIE  # a reference margin below this counts a token as a near-tie
    tokens: int = 0
    agree: int = 0
    near_ties: int = 0
    near_tie_flips: int = 0

    @property
    def agreement(self) -> float:
        """Agreement among tokens that are not near-ties."""
        decided = self.tokens - self.near_ties
        return (
            1.0 if decided == 0 else (self.agree - (self.near_ties - self.near_tie_flips)) / decided
        )

    @property
    def passed(self) -> bool:
        return self.agreement >= self.tolerance

    def update(self, ref_chosen: np.ndarray, out_chosen: np.ndarray, margin: np.ndarray) -> None:
        """chosen: bool [..., E]; margin: [...] distance of each token from a routing flip."""
        ref2 = ref_chosen.reshape(-1, ref_chosen.shape[-1])
        out2 = out_chosen.reshape(-1, out_chosen.shape[-1])
        same = (ref2 == out2).all(axis=-1)
        near = margin.reshape(-1) < self.near_tie
        self.tokens += same.size
        self.agree += int(same.sum())
        self.near_ties += int(near.sum())
        self.near_tie_flips += int((near & ~same).sum())


@dataclass
class VerifyReport:
    """Truthy when every output and every block's routing is within tolerance."""

    outputs: list[OutputStats]
    routing: list[RoutingStats]
    shapes: list[dict[str, list[int]]] = field(default_factory=list)
    dims: list[dict[str, int]] = field(default_factory=list)  # the dynamic dims of each shape
    notes: list[str] = field(default_factory=list)
    decode: list = field(default_factory=list)  # `DecodeStep`s of a cache artifact

    def __bool__(self) -> bool:
        return (
            all(o.passed for o in self.outputs)
            and all(r.passed for r in self.routing)
            and all(s.passed for s in self.decode)
        )

    def to_dict(self) -> dict:
        return {
            "passed": bool(self),
            "shapes": self.shapes,
            "outputs": [
                {
                    "name": o.name,
                    "max_abs": o.max_abs,
                    "mean_abs": o.mean_abs,
                    "max_rel": o.max_rel,
                    "rel_l2": o.rel_l2,
                    "rel_l2_per_shape": o.per_run,
                    "tolerance": o.tolerance,
                    **(
                        {"atol": o.atol, "rtol": o.rtol, "outside": o.outside}
                        if o.elementwise
                        else {}
                    ),
                    "passed": o.passed,
                }
                for o in self.outputs
            ],
            "routing": [
                {
                    "block": r.block,
                    "output": r.output,
                    "tokens": r.tokens,
                    "agreement": r.agreement,
                    "near_ties": r.near_ties,
                    "near_tie_flips": r.near_tie_flips,
                    "tolerance": r.tolerance,
                    "passed": r.passed,
                }
                for r in self.routing
            ],
            "decode": [s.to_dict() for s in self.decode],
            "notes": self.notes,
        }
