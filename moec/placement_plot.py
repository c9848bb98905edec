"""``moec place --plot``: tokens per device on held-out tokens, contiguous against the plan,
one panel per MoE block."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moec.errors import MoecError
from moec.placing import PlacementReport
from moec.runtime.placement_policies import contiguous

__all__ = ["plot_placement"]


def plot_placement(report: PlacementReport, path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoecError("--plot needs matplotlib: pip install 'moec[plot]'") from e
    placement = report.placement
    blocks = placement.blocks
    fig, axes = plt.subplots(len(blocks), 1, figsize=(8, 1.8 + 1.6 * len(blocks)), squeeze=False)
    for ax, placed in zip(axes[:, 0], blocks, strict=True):
        held = np.asarray(placement.load[placed.block]["held_out"], dtype=np.float64)
        base = contiguous(placed.block, held, placement.devices).device_load(held)
        plan = placed.device_load(held)
        devices = np.arange(placement.devices)
        ax.bar(devices - 0.2, base, width=0.4, label="contiguous")
        ax.bar(devices + 0.2, plan, width=0.4, label=placement.policy)
        ax.axhline(base.mean(), color="gray", lw=0.5)  # the even share
        ax.set_title(placed.block or "(model)", fontsize=9)
        ax.set_ylabel("tokens")
        ax.set_xticks(devices)
    axes[-1, 0].set_xlabel("device")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
