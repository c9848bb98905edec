"""The lossy passes' choices and the distillation's defaults, without torch: ``moec compile``
builds its options from them (``moec --help`` does not import torch) and the passes check their
arguments against them."""

from __future__ import annotations

from dataclasses import dataclass

from moec.errors import MoecError

__all__ = ["DISTILL_INITS", "DISTILL_TRAIN", "MERGE_METHODS", "PRUNE_METHODS", "DistillOptions"]

MERGE_METHODS = ("hc", "router-logits", "random")
PRUNE_METHODS = ("frequency", "reap", "reconstruction")
DISTILL_INITS = ("concat", "average")
DISTILL_TRAIN = ("all", "ffn")


@dataclass(frozen=True)
class DistillOptions:
    """How ``distill-dense`` fits and trains its dense FFNs (`moec.passes.distill_dense`)."""

    width: int | None = None
    steps: int = 0
    blocks: tuple[str, ...] | None = None
    init: str = "concat"
    train: str = "all"
    lr: float = 1e-3
    batch_tokens: int = 1024
    label_weight: float = 0.0
    block_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.width is not None and self.width <= 0:
            raise MoecError(f"--dense-width must be > 0, not {self.width}")
        if self.steps < 0:
            raise MoecError(f"--distill-steps must be >= 0, not {self.steps}")
        if self.block_steps is not None and self.block_steps < 0:
            raise MoecError(f"distillation block steps must be >= 0, not {self.block_steps}")
        if not self.lr > 0:
            raise MoecError(f"distillation learning rate must be > 0, not {self.lr}")
        if self.batch_tokens <= 0:
            raise MoecError(f"distillation batch tokens must be > 0, not {self.batch_tokens}")
        if self.init not in DISTILL_INITS:
            raise MoecError(f"distillation init {self.init!r}: choose one of {DISTILL_INITS}")
        if self.train not in DISTILL_TRAIN:
            raise MoecError(f"--distill-train {self.train!r}: choose one of {DISTILL_TRAIN}")
        if not 0.0 <= self.label_weight <= 1.0:
            raise MoecError(f"distillation label weight must be in [0, 1], not {self.label_weight}")
