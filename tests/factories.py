"""`pkg.module:factory` sources used by the tests (importable as ``factories:NAME``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moec.models import ModelSource, build_zoo


def plain_mlp():
    """A model with no MoE block at all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, (torch.randn(2, 8),)


@torch.library.custom_op("moectest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mysterious(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return torch.ops.moectest.mystery(self.linear(x))


def unlowerable():
    """A model calling an op that has no ONNX translation."""
    return Mysterious(), (torch.randn(2, 3, 8),)


def mixtral_block() -> ModelSource:
    return build_zoo("mixtral", seed=3)


def big_mixtral_block() -> ModelSource:
    """A Mixtral-like block with 800 MB of expert weights."""
    return build_zoo("mixtral", hidden=1024, num_experts=8, expert_size=8192)


def marking_mixtral_block() -> ModelSource:
    """`mixtral_block` that also creates the file $MOEC_TEST_MARKER: code a factory runs."""
    Path(os.environ["MOEC_TEST_MARKER"]).touch()
    return mixtral_block()
