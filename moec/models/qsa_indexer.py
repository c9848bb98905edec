"""An export-friendly ``_select_tokens`` for Qwen4-Exp's QSA indexer.

The family loops over every (sequence, query) in Python, takes ``nonzero`` of the query's
visible keys and branches on their count, which torch.export cannot trace with dynamic batch and
sequence. This computes the same selection for all queries at once:

- the visible keys of a query, in position order, fall into blocks of ``compress_ratio``; only
  the ``count // ratio`` complete blocks compete, the rest (the tail) is always selected;
- a block's key is the float mean of its keys, RMS-normed and rotated at the block's first
  position; its score is ``sum_heads relu(q . key) / sqrt(head_dim)``;
- the ``block_topk`` best complete blocks are selected. Scores that tie exactly (ReLU zeros)
  are broken by the top-k that runs: arbitrarily by torch.topk, by the lower index in ONNX.

Shapes: q [B, S, H, D], raw_keys [B, K, D], full_cos/full_sin [B, K, Dr], attention_mask
[B, 1, S, K] (bool: visible, or float: 0 where visible); returns bool [B, 1, S, K].
"""

from __future__ import annotations

import math
import sys

import torch

__all__ = ["select_tokens"]


def select_tokens(self, hidden_states, q, raw_keys, full_cos, full_sin, attention_mask, **kwargs):
    """The family's ``_select_tokens`` (a method of the indexer ``self``), all queries at once."""
    ratio, device = self.compress_ratio, q.device
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    visible = visible[:, 0]  # [B, S, K]
    batch, _, keys = visible.shape
    seen = visible.long().cumsum(-1)  # visible keys up to and including each key
    rank = seen - 1  # a visible key's place among the query's visible keys
    count = seen[..., -1:]
    complete = count // ratio  # [B, S, 1] complete blocks
    block_of_key = torch.div(rank, ratio, rounding_mode="floor")
    in_block = visible & (block_of_key < complete)

    # the keys in order, visible ones first: the inverse of this permutation of slots
    position = torch.arange(keys, device=device).expand_as(rank)
    slot = torch.where(visible, rank, count + position - seen)
    order = torch.zeros_like(slot).scatter(-1, slot, position)
    # J = one candidate block per key, not keys // ratio: a dim derived from the key count
    # makes export guard on it (and refuse short sequences); the extra blocks never complete
    slots = torch.arange(keys, device=device).unsqueeze(-1) * ratio
    members = order[..., (slots + torch.arange(ratio, device=device)).clamp(max=keys - 1)]
    rows = torch.arange(batch, device=device).view(batch, 1, 1)
    grouped = raw_keys[rows.unsqueeze(-1), members]  # [B, S, J, ratio, D]
    pooled = self.k_layernorm(grouped.float().mean(dim=3).to(raw_keys.dtype))
    starts = members[..., 0]
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb
    block_keys = rotary(
        pooled.unsqueeze(-2),
        cos=full_cos[rows, starts],
        sin=full_sin[rows, starts],
        unsqueeze_dim=-2,
    ).squeeze(-2)  # [B, S, J, D]
    scores = torch.matmul(q.float(), block_keys.float().transpose(-1, -2)).transpose(-1, -2)
    scores = torch.relu(scores).sum(dim=-1) / math.sqrt(self.index_head_dim)  # [B, S, J]

    valid = torch.arange(keys, device=device) < complete  # [B, S, J]
    # padded with block_topk never-chosen blocks, so that top-k never asks for more than J
    never = scores.new_full((*scores.shape[:-1], self.block_topk), float("-inf"))
    padded = torch.cat([scores.masked_fill(~valid, float("-inf")), never], dim=-1)
    best = padded.topk(self.block_topk, dim=-1).indices
    chosen = torch.zeros_like(padded).scatter(-1, best, 1.0)[..., :keys].bool() & valid
    in_chosen = chosen.gather(-1, block_of_key.clamp(min=0)) & in_block
    return (in_chosen | (visible & ~in_block)).unsqueeze(1)
