"""Kolibri 1.1's indexer, rewritten for export without its loop over query groups, selects the
same keys and pool as transformers' loop on random queries, keys and masks (left padding and
documents that start mid-sequence give rows different first keys), and exports with a dynamic
sequence length."""

from __future__ import annotations

import pytest
import torch
from hf_families import FAMILIES
from torch.export import Dim
from transformers.models.kolibri1_1 import modeling_kolibri1_1 as kolibri

import moec.models.hf_patches as hf_patches
from moec.models.kolibri_indexer import loop_free_indexer

CONFIG = kolibri.Kolibri1_1Config(**FAMILIES["kolibri1_1"]["kwargs"])


def _inputs(seed: int, batch: int = 3, length: int = 29):
    """Queries [B, 4, S, 16], keys [B, 2, S, 16] (scaled so NVFP4 rounding ties), and a 4-D
    causal mask with left padding in row 1 and a second document from key 11 in row 2."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, 4, length, 16, generator=g).round()
    keys = torch.randn(batch, 2, length, 16, generator=g).round()
    position = torch.arange(length)
    visible = (position[None, :] <= position[:, None]).expand(batch, length, length).clone()
    visible[1, :, :5] = False
    late = position >= 11
    visible[2] &= ~(late[:, None] & ~late[None, :])  # the second document sees only itself
    return queries, keys, visible[:, None]


@pytest.mark.parametrize("source", [True, False])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("as_bias", [False, True])
def test_selection_matches_the_loop(seed, source, as_bias):
    indexer = kolibri.Kolibri1_1Indexer(CONFIG, layer_idx=1 if source else 0)
    queries, keys, visible = _inputs(seed)
    mask = visible if not as_bias else torch.zeros(visible.shape).masked_fill(~visible, -1e9)
    random_pool = torch.rand(visible[:, 0].shape, generator=torch.Generator().manual_seed(seed))
    pool = None if source else (random_pool > 0.3) & visible[:, 0]  # a preceding indexer's
    theirs = indexer(queries, keys, mask, pool)
    ours = loop_free_indexer(None)(indexer, queries, keys, mask, pool)
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])
    long_rows = visible[:, 0].sum(-1) > indexer.pool_size
    assert long_rows.any() and not torch.equal(theirs[0][:, 0], visible[:, 0])  # a real selection


def test_rewrite_exports_with_a_dynamic_sequence():
    indexer = kolibri.Kolibri1_1Indexer(CONFIG, layer_idx=1)
    queries, keys, visible = _inputs(0)
    with hf_patches.export_patches(indexer) as applied:
        seq = Dim("seq", min=2, max=64)
        shapes = ({2: seq}, {2: seq}, {2: seq, 3: seq}, None)
        args = (queries, keys, visible, None)
        program = torch.export.export(indexer, args, dynamic_shapes=shapes)
    assert applied == ["Kolibri1_1Indexer: its loop over query groups as batched selection"]
    short = _inputs(1, length=6)
    assert torch.equal(program.module()(*short, None)[0], indexer(*short, None)[0])
    assert torch.equal(program.module()(*_inputs(2), None)[0], indexer(*_inputs(2), None)[0])
