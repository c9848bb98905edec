"""Checks of generation shared by the decoding and Hugging Face family tests."""

from __future__ import annotations

import torch

NEW_TOKENS = 32


def left_padded_prompt(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


def assert_same_as_transformers(runner, model, ids, mask) -> None:
    """Token for token; where they part, the reference's choice must have been a near-tie."""
    ours = runner.generate(ids, max_new_tokens=NEW_TOKENS, attention_mask=mask, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    assert ours.shape == ref.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    if torch.equal(ours, ref):
        return
    row, col = map(int, (ours != ref).nonzero()[0])
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones_like(ref[:, ids.shape[1] :])], dim=1)
        rows = slice(row, row + 1)
        logits = model(ref[rows, :col], attention_mask=full_mask[rows, :col]).logits[0, -1]
    top = logits.topk(2).values
    assert float(top[0] - top[1]) < 1e-4 * float(logits.abs().max()), (row, col, ours, ref)
