"""Slice assignments (slice_scatter once functional) become concatenations before ONNX export,
giving the same values."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from moec.compiler.slice_scatter_to_cat import slice_scatters_as_cats


class RotaryHalves(nn.Module):
    """Writes two halves of a new last dim as DeepSeek's MLA writes its keys, and a middle
    slice of a dynamic dim."""

    def forward(self, nope, rope, x):
        key = nope.new_empty(*nope.shape[:-1], nope.shape[-1] + rope.shape[-1])
        key[..., : nope.shape[-1]] = nope
        key[..., nope.shape[-1] :] = rope
        y = x.clone()
        y[:, 1:3] = x[:, 1:3] * 2
        return key, y


def test_slice_scatters_become_cats_with_the_same_values():
    args = (torch.randn(2, 5, 4), torch.randn(2, 5, 3), torch.randn(2, 6, 3))
    seq = Dim("seq")
    program = torch.export.export(
        RotaryHalves(), args, dynamic_shapes=({1: seq}, {1: seq}, {1: Dim("other", min=3)})
    ).run_decompositions({})
    targets = [n.target for n in program.graph.nodes]
    assert targets.count(torch.ops.aten.slice_scatter.default) == 3
    assert slice_scatters_as_cats(program) == 3
    assert torch.ops.aten.slice_scatter.default not in [n.target for n in program.graph.nodes]
    for seq_len, other in ((5, 6), (1, 3), (7, 9)):
        inputs = (torch.randn(2, seq_len, 4), torch.randn(2, seq_len, 3), torch.randn(2, other, 3))
        for got, want in zip(program.module()(*inputs), RotaryHalves()(*inputs), strict=True):
            assert torch.equal(got, want)
