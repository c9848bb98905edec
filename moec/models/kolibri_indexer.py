"""Kolibri 1.1's sparse-attention indexer without data-dependent Python control flow.

transformers' ``Kolibri1_1Indexer`` loops over the groups of queries that share their first
visible key (``starts[b].unique().tolist()``), slices the keys from that start, and selects
(1) a pool of key blocks of ``compression`` keys and (2) the ``topk`` keys of the pool, plus
sinks and local keys, for the queries that see more keys than the pool or budget. torch.export
cannot trace the loop. The rewrite computes every query row at once, over all keys, with each
row's positions counted from its own start (``p = k - start``):

- a block j of a row starts at key ``start + j * compression``; the block sums at every key
  offset are computed once (the same ``compression``-term sum), then gathered per row;
- keys before a row's start, and blocks past its last, score ``-inf`` (never chosen), so one
  top-k over the whole row of keys picks what the loop picked from its slice, ties included;
- rows the loop skips (short ones) keep their visible keys (a bool mask, with no Where: ONNX
  Runtime has none for bool).

The family's own ``nvfp4_fake_quantize`` and weights-free scoring are reused; the result is the
same selection as eager (`tests/test_kolibri_indexer.py`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

__all__ = ["loop_free_indexer"]


def loop_free_indexer(_original):
    """A ``Kolibri1_1Indexer.forward`` with the query-group loops as batched tensor ops."""

    def forward(self, query_states, key_states, attention_mask, index_pool=None):
        mask = attention_mask[:, 0]
        visible = mask if mask.dtype == torch.bool else mask == 0
        quantize = sys.modules[type(self).__module__].nvfp4_fake_quantize
        starts, lengths = _starts_and_lengths(visible)
        queries = quantize(query_states[:, : self.num_heads]).float()  # [B, h, Q, D]
        if self.is_pool_source:
            index_pool = _select_pool(self, quantize, queries, key_states, visible, starts, lengths)
        selected = _select_tokens(
            self, quantize, queries, key_states, visible, index_pool, starts, lengths
        )
        return selected.unsqueeze(1), index_pool

    return forward


def _starts_and_lengths(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query row's first visible key and the keys from it to its last visible one
    (0 when it sees none), [B, Q, 1]."""
    starts = visible.int().argmax(-1)
    ends = visible.shape[-1] - visible.flip(-1).int().argmax(-1)
    return starts[..., None], ((ends - starts) * visible.any(-1))[..., None]


def _scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, h, Q, D] queries against [B, K, D] keys -> [B, Q, K], summed over heads in order."""
    scores = queries.new_zeros(queries.shape[0], queries.shape[2], keys.shape[1])
    for head in range(queries.shape[1]):
        scores = scores + (queries[:, head] @ keys.transpose(1, 2)).relu()
    return scores * self.head_weight


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indexer's ``top_k_mask`` for a row of any length: ``-inf`` columns pad it to k."""
    padded = F.pad(scores, (0, k), value=float("-inf"))
    kth_score = padded.topk(k, dim=-1).values[..., -1:]
    above = scores > kth_score
    tied = (scores == kth_score) & (kth_score > float("-inf"))
    free_slots = k - above.sum(-1, keepdim=True)
    tie_rank = tied.cumsum(-1, dtype=torch.int32)
    return above | (tied & (tie_rank <= free_slots))


def _select_pool(self, quantize, queries, keys, visible, starts, lengths) -> torch.Tensor:
    c, key_count = self.compression, visible.shape[-1]
    unseen = ~visible.any(1)  # [B, K]
    document_keys = keys[:, 0].masked_fill(unseen[..., None], 0.0).float()
    window = torch.arange(c, device=keys.device)
    offsets = _in_range(torch.arange(key_count, device=keys.device)[:, None] + window, key_count)
    blocks = document_keys[:, offsets]  # [B, K, c, D]: the block starting at every key
    summaries = quantize(blocks.sum(2) / c)
    at_every_key = _scores(self, queries, summaries)  # [B, Q, K]
    block = torch.arange(key_count, device=keys.device)  # block j of a row (at most K of them)
    first_key = _in_range(starts + block * c, key_count)
    scores = at_every_key.gather(-1, first_key)
    scores = torch.where(block < lengths // c, scores, 0.0)
    scores = scores.masked_fill(block >= (lengths + c - 1) // c, float("-inf"))
    chosen = _top_k_mask(scores, self.pool_size // c)
    position = torch.arange(key_count, device=keys.device) - starts  # [B, Q, K]
    chosen = chosen.gather(-1, position.clamp(min=0) // c) & (position >= 0)
    return visible & (chosen | (lengths <= self.pool_size))  # short rows: all they see


def _in_range(index: torch.Tensor, size) -> torch.Tensor:
    """``index`` with entries past ``size`` (of incomplete blocks, whose scores are replaced)
    set to 0; a comparison, as ONNX export takes no clamp to a symbolic size."""
    return torch.where(index < size, index, 0)


def _select_tokens(self, quantize, queries, keys, visible, pool, starts, lengths) -> torch.Tensor:
    budget = self.topk + self.num_local_tokens + self.num_sink_tokens
    scores = _scores(self, queries, quantize(keys[:, 0]).float())
    position = torch.arange(visible.shape[-1], device=keys.device) - starts  # [B, Q, K]
    sinks = (position >= 0) & (position < self.num_sink_tokens)
    local = (position >= lengths - self.num_local_tokens) & (position < lengths)
    before_local = (position >= 0) & (position < lengths - self.num_local_tokens)
    candidates = pool & ~sinks & before_local
    chosen = _top_k_mask(scores.masked_fill(~candidates, float("-inf")), self.topk)
    return visible & (chosen | sinks | local | (lengths <= budget))
