"""Sequence dims of models whose code splits the sequence into blocks or chunks (MiniMax's
lightning attention, GraniteMoeHybrid's Mamba2 chunked scan, MiniMax-M3's block indexer): their
artifacts take every length, one token included, and verify."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hf_families import save_tiny
from torch import nn

import moec
from moec.models.hf_models import CausalLMLogits


class _KwargsOnly(nn.Module):
    """A head whose forward takes the cache switch only through ``**kwargs``."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.seen = kwargs
        return SimpleNamespace(logits=input_ids.float())


def test_the_wrapper_turns_the_cache_off_through_kwargs():
    model = _KwargsOnly()
    ids = torch.ones(1, 3, dtype=torch.int64)
    CausalLMLogits(model)(ids, ids)
    assert model.seen == {"use_cache": False}


class _CeilBlocks(nn.Module):
    """[B, S] -> the sum of each block of 4 tokens [B, ceil(S / 4)], the last one padded."""

    def forward(self, x):
        blocks = -(-x.shape[1] // 4)
        padded = F.pad(x, (0, blocks * 4 - x.shape[1]))
        return padded.reshape(x.shape[0], blocks, 4).sum(-1)


def test_ceil_division_of_a_dim_floors_in_onnx(tmp_path):
    x = torch.randn(2, 11, generator=torch.Generator().manual_seed(0))
    art = moec.compile(_CeilBlocks(), (x,), target="onnx", output=tmp_path / "out").path
    with moec.load(art) as runner:
        for seq in (1, 5, 8, 13):
            x = torch.randn(1, seq, generator=torch.Generator().manual_seed(seq))
            assert torch.allclose(runner(x), _CeilBlocks()(x), atol=1e-6), seq


@pytest.mark.parametrize("family", ["minimax", "granitemoehybrid", "minimax_m3_vl"])
def test_block_and_chunk_families_take_every_sequence_length(tmp_path, family):
    directory = save_tiny(family, tmp_path / "model")
    result = moec.compile(f"hf:{directory}", target="onnx", output=tmp_path / "out")
    ids = next(spec for spec in result.manifest.inputs if spec.name == "input_ids")
    assert ids.shape[1].min == 1, result.notes
    report = moec.verify(result.path)
    assert report, report.to_dict()
    assert [1, 1] in [shape["input_ids"] for shape in report.shapes]


def test_inkling2_short_convolution_exports_for_every_length_with_the_rewrite():
    """Its flipped unfold view made export require at least the kernel size (4) tokens."""
    from torch.export import Dim
    from transformers.models.inkling2.modeling_inkling2 import Inkling2DynamicShortConvolution

    from moec.models.hf_patches import export_patches

    torch.manual_seed(0)
    conv = Inkling2DynamicShortConvolution(8, 8, 2, 4, layer_idx=0, conv_idx=0).eval()
    nn.init.normal_(conv.static_weight)

    class Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, mask):
            return self.conv(x, x, conv_mask=mask)

    inputs = (torch.randn(2, 11, 8), torch.ones(2, 11))
    seq = {0: Dim.AUTO, 1: Dim.AUTO}
    with export_patches(conv) as applied:
        program = torch.export.export(Call(), inputs, dynamic_shapes=(seq, seq))
    assert applied and "no minimum length" in applied[0]
    assert all(int(r.lower) <= 2 for r in program.range_constraints.values())
    for length in (1, 2, 3, 7):
        x, mask = torch.randn(1, length, 8), torch.ones(1, length)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x, mask), conv(x, x, conv_mask=mask))
