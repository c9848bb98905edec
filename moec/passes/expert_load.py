"""Per-block expert load on calibration data (``moec inspect SRC --calib FILE``): how often each
expert is chosen and the gate mass it receives, the numbers a merge or prune starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moec.errors import MoecError
from moec.models import ModelSource
from moec.passes.calibration import CalibrationData
from moec.passes.compression_state import CompressionState

__all__ = ["ExpertLoad", "expert_load", "plot_expert_load"]


@dataclass
class ExpertLoad:
    block: str
    tokens: int
    frequency: np.ndarray  # [E] fraction of tokens routed to each expert
    gate_mass: np.ndarray  # [E] mean combine weight per token

    @property
    def imbalance(self) -> float:
        """Busiest expert's load over the mean load (1.0: perfectly even)."""
        mean = self.frequency.mean()
        return float(self.frequency.max() / mean) if mean > 0 else 0.0


def expert_load(source: ModelSource, calibration: CalibrationData) -> list[ExpertLoad]:
    """Load of every MoE block with FFN experts, over all calibration rows."""
    rows = np.concatenate([calibration.fit, calibration.held_out])
    state = CompressionState(source, CalibrationData(rows, rows[:0], calibration.origin))
    return [
        ExpertLoad(name, s.tokens, s.frequency.numpy(), s.gate_mass.numpy())
        for name, s in state.stats().items()
    ]


def plot_expert_load(loads: list[ExpertLoad], path: str | Path, title: str) -> None:
    """Two heat maps, blocks x experts: frequency and gate mass."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoecError("--plot needs matplotlib: pip install 'moec[plot]'") from e
    width = max(len(load.frequency) for load in loads)
    grids = [np.full((len(loads), width), np.nan) for _ in range(2)]
    for i, load in enumerate(loads):
        grids[0][i, : len(load.frequency)] = load.frequency
        grids[1][i, : len(load.gate_mass)] = load.gate_mass
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.35 * len(loads)), squeeze=False)
    for ax, grid, what in zip(
        axes[0], grids, ("fraction of tokens", "gate mass per token"), strict=True
    ):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(loads)), [load.block or "(model)" for load in loads])
        ax.set_title(what)
        bar = fig.colorbar(image, ax=ax)
        if what == "fraction of tokens":  # an even load: each expert gets k/E of the tokens
            for level in sorted({round(float(load.frequency.mean()), 6) for load in loads}):
                bar.ax.axhline(level, color="white", lw=2)
                bar.ax.text(
                    1.6,
                    level,
                    "k/E",
                    va="center",
                    fontsize=8,
                    transform=bar.ax.get_yaxis_transform(),
                )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
