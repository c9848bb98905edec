"""Qwen4-Exp's QSA indexer: moec's all-queries-at-once token selection (used while capturing)
selects what the family's per-query loop selects, exports with dynamic batch and sequence, and
runs on ONNX Runtime. Inputs keep every block score positive: exact ReLU ties are broken
arbitrarily by torch.topk and by the lower index in moec's rewrite."""

from __future__ import annotations

import pytest
import torch
from hf_families import build_tiny
from torch import nn

import moec
from moec.models.qsa_indexer import select_tokens

HEADS, HEAD_DIM, HIDDEN = 2, 16, 64


@pytest.fixture(scope="module")
def indexer() -> nn.Module:
    model = build_tiny("qwen4_exp")
    found = next(m for m in model.modules() if type(m).__name__ == "Qwen4ExpTextQSAIndexer")
    found.token_budget, found.block_topk = 4, 2  # select among blocks (the tiny model keeps all)
    return found


def tie_free(batch: int, queries: int, keys: int, g: torch.Generator) -> tuple:
    """(q [B, S, H, D], raw_keys [B, K, D], cos, sin [B, K, D]) whose block scores are > 0."""
    q = torch.randn(batch, queries, HEADS, HEAD_DIM, generator=g).abs()
    raw_keys = torch.randn(batch, keys, HEAD_DIM, generator=g).abs()
    cos = torch.rand(batch, keys, HEAD_DIM, generator=g) + 0.5
    sin = torch.rand(batch, keys, HEAD_DIM, generator=g) * 0.05
    return q, raw_keys, cos, sin


@pytest.mark.parametrize("float_mask", [False, True])
def test_selection_matches_the_family_loop(indexer, float_mask):
    g = torch.Generator().manual_seed(0)
    selected = 0
    for batch, queries, past in [(1, 1, 0), (2, 7, 0), (3, 13, 3), (2, 20, 1)]:
        keys = queries + past
        q, raw_keys, cos, sin = tie_free(batch, queries, keys, g)
        causal = torch.ones(queries, keys, dtype=torch.bool).tril(past)
        visible = causal & (torch.rand(batch, 1, 1, keys, generator=g) > 0.2)
        mask = visible
        if float_mask:
            mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        hidden = torch.zeros(batch, queries, HIDDEN)
        with torch.no_grad():
            expected = indexer._select_tokens(hidden, q, raw_keys, cos, sin, mask)
            got = select_tokens(indexer, hidden, q, raw_keys, cos, sin, mask)
        assert torch.equal(got, expected)
        selected += int((visible & ~got).sum())
    assert selected > 0  # some visible keys were left out: the selection was exercised


class _Selection(nn.Module):
    """The indexer's selection for causal queries over as many keys."""

    def __init__(self, indexer: nn.Module):
        super().__init__()
        self.indexer = indexer

    def forward(self, q, raw_keys, cos, sin):
        batch, queries = q.shape[:2]
        mask = torch.ones(queries, queries, dtype=torch.bool).tril().expand(batch, 1, -1, -1)
        hidden = torch.zeros(batch, queries, HIDDEN)
        return self.indexer._select_tokens(hidden, q, raw_keys, cos, sin, mask)


def test_selection_exports_and_runs_on_onnx_runtime(indexer, tmp_path):
    g = torch.Generator().manual_seed(1)
    model = _Selection(indexer).eval()
    result = moec.compile(model, tie_free(2, 8, 8, g), target="onnx", output=tmp_path / "out")
    assert any("Qwen4ExpTextQSAIndexer" in note for note in result.notes)
    with moec.load(result.path) as runner:
        for batch, queries in [(1, 1), (1, 3), (2, 13), (3, 32)]:
            inputs = tie_free(batch, queries, queries, g)
            with torch.no_grad():
                expected = model(*inputs)
            assert torch.equal(runner(*inputs), expected), (batch, queries)
