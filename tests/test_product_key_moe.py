"""The product-key adapter (Doge's rank-1 experts) and the export rewrite of Doge's dynamic mask."""

from __future__ import annotations

import pytest
import torch
from hf_families import build_tiny

from moec.compiler.capture import _swapped
from moec.errors import UnsupportedBlockError
from moec.models.adapters import find_moe_blocks
from moec.models.hf_patches import export_patches
from moec.models.product_key_moe import ProductKeyMoEAdapter

pytest.importorskip("transformers.models.doge")


@pytest.fixture(scope="module")
def doge():
    return build_tiny("doge")


def test_doge_blocks_convert_to_rank_one_plain_experts(doge):
    matches = find_moe_blocks(doge)
    assert [m.adapter for m in matches] == ["product-key", "product-key"]
    spec, block = matches[0].spec, matches[0].module
    assert (spec.expert_kind, spec.expert_size, spec.routing) == ("plain", 1, "external")
    assert spec.num_experts == 4 and spec.top_k == 2
    assert torch.equal(matches[0].weights.w_up[:, 0], block.down_embed.weight)
    assert matches[0].conversion.returns_router_logits


def test_swapped_doge_matches_eager_with_tokens_mixed_across_the_batch(doge):
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = doge(ids).logits
        with _swapped(doge, find_moe_blocks(doge)):
            ours = doge(ids).logits
    assert float((ours - ref).norm() / ref.norm()) < 1e-5


def test_gate_exports_with_a_free_batch(doge):
    """Doge's own view(2, B*S, K) fixes the batch at 2 (the example's) in torch.export."""
    gate = find_moe_blocks(doge)[0].conversion.gate
    x = torch.randn(2, 5, 64)
    batch = torch.export.Dim("batch")
    program = torch.export.export(gate, (x,), dynamic_shapes=({0: batch, 1: None},))
    y = torch.randn(3, 5, 64)
    for ours, theirs in zip(program.module()(y), gate(y), strict=True):
        assert torch.equal(ours, theirs)


def test_block_whose_forward_differs_is_refused(doge):
    block = find_moe_blocks(doge)[0].module
    original = type(block).forward

    def doubled(self, hidden_states, **kwargs):
        out, logits = original(self, hidden_states)
        return 2 * out, logits

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(block), "forward", doubled)
        with pytest.raises(UnsupportedBlockError, match="product-key routing"):
            ProductKeyMoEAdapter().convert(block)


@pytest.mark.parametrize("keys", [3, 9])  # below and above the window of 4
def test_dynamic_mask_rewrite_equals_the_original(doge, keys):
    attn = doge.model.layers[0].self_attn
    g = torch.Generator().manual_seed(keys)
    hidden, dt = torch.randn(2, keys, 64, generator=g), torch.randn(2, 2, keys, generator=g)
    causal = torch.full((keys, keys), torch.finfo(torch.float32).min).triu(1)
    mask = causal.expand(2, 1, keys, keys)
    ref = attn.prepare_dynamic_mask(hidden, dt, 4, mask)
    with export_patches(doge) as applied:
        ours = attn.prepare_dynamic_mask(hidden, dt, 4, mask)
    assert any("dynamic mask" in note for note in applied)
    assert torch.equal(ours, ref)
