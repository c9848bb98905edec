"""The file of the ``torch`` target's artifact: the captured program itself, whose
``moec::moe`` nodes run moec's kernels wherever `moec.ir.moe_op` is imported."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from moec.ir.program import CapturedProgram
from moec.registry import Target

__all__ = ["write_pt2"]


def write_pt2(program: CapturedProgram, directory: Path, target: Target) -> dict[str, str]:
    """Save ``program`` with torch.export.save as ``target.files``' model (role -> file).

    A family that stacks gate and up as one ``gate_up_proj`` hands moec's op two views of it:
    torch.export.save writes their storage once (as it should) and warns that no one view covers
    it, a warning about its own bookkeeping that says nothing of the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No complete tensor found in the group", UserWarning)
        torch.export.save(program.program, directory / target.files["model"])
    return {"model": target.files["model"]}
