"""DeepSeek-V4's KV compressors and indexer without branches on the sequence length.

Without a cache, transformers' ``DeepseekV4HCACompressor``, ``DeepseekV4CSACompressor`` and
``DeepseekV4Indexer`` compress the ``S // rate`` complete windows of ``rate`` tokens, and branch
on that count (none: no compressed entries; more than one: overlap the previous window; the
indexer's ``min(index_topk, count)``). torch.export fixes each branch to the example's side, so
an artifact refused short inputs. The rewrites compute the same entries for every length:

- they always compress ``W = S // rate + 2`` windows, the last two padded with zeros past the
  sequence (a partial window, or all padding): never fewer than two, as export would otherwise
  guard on a window count of one (in the strides of a reshape or slice);
- those two entries are hidden from every query (``-inf`` in the block bias, never a valid
  indexer pick), as are entries a query may not see yet, so attention sees what eager's give;
- the overlap of window ``w - 1`` into window ``w`` reads a window of zeros before the sequence
  for window 0, whose gate is ``-inf`` as in eager (softmax weight 0);
- the indexer's top-k is over ``index_topk`` more hidden columns, a constant ``k`` for any
  ``W``; it marks hidden picks ``-1`` as eager does for picks a query may not see.

With a cache they run the original methods. `tests/test_deepseek_v4_compressors.py` checks the
logits against eager for every short length.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

__all__ = ["branch_free_csa", "branch_free_hca", "branch_free_indexer"]


def _entries(seq_len, rate: int):
    """How many entries the rewrites compress: the complete windows and two padded ones."""
    return seq_len // rate + 2


def _windows(x: torch.Tensor, rate: int, count, before: int = 0) -> torch.Tensor:
    """x [B, S, C] as ``count`` windows [B, count, rate, C] of consecutive tokens, after
    ``before`` windows of zeros, with zeros past the sequence's end."""
    batch, seq_len, channels = x.shape
    # padded to exactly that many windows, not sliced: a slice would make export guard on
    # the length's parity
    padded = F.pad(x, (0, 0, before * rate, (count - before) * rate - seq_len))
    return padded.reshape(batch, count, rate, channels)


def _rotated(module, compressed: torch.Tensor, rate: int) -> torch.Tensor:
    """compressed [B, W, D] with the rope of entry ``w`` at position ``w * rate``."""
    batch, count, _ = compressed.shape
    positions = (torch.arange(count, device=compressed.device) * rate).unsqueeze(0)
    cos, sin = module.rotary_emb(
        compressed, position_ids=positions.expand(batch, -1), layer_type=module.rope_layer_type
    )
    apply = sys.modules[type(module).__module__].apply_rotary_pos_emb
    return apply(compressed.unsqueeze(1), cos, sin).squeeze(1)


def _overlapped(module, hidden_states: torch.Tensor, count, head_dim: int) -> torch.Tensor:
    """The CSA layout compressed: entry ``w`` [B, W, head_dim] is the softmax-gated sum of
    window ``w - 1``'s first ``head_dim`` channels and window ``w``'s last ``head_dim``."""
    rate = module.compress_rate
    kv = _windows(module.kv_proj(hidden_states), rate, count + 1, before=1)
    gate = _windows(module.gate_proj(hidden_states), rate, count + 1, before=1)
    gate = gate + module.position_bias
    first = torch.arange(count, device=gate.device).view(1, -1, 1, 1) == 0
    previous_gate = gate[:, :-1, :, :head_dim].masked_fill(first, float("-inf"))
    kv = torch.cat([kv[:, :-1, :, :head_dim], kv[:, 1:, :, head_dim:]], dim=2)
    gate = torch.cat([previous_gate, gate[:, 1:, :, head_dim:]], dim=2)
    weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
    return _rotated(module, module.kv_norm((kv * weights).sum(dim=2)), rate)


def _visible_before(position_ids: torch.Tensor, rate: int, seq_len) -> torch.Tensor:
    """[B, S]: how many compressed entries each query sees, of the complete windows only."""
    return ((position_ids + 1) // rate).clamp(max=seq_len // rate)


def _hidden(position_ids: torch.Tensor, rate: int, seq_len, count) -> torch.Tensor:
    """[B, S, W] bool: the entries a query may not see."""
    entries = torch.arange(count, device=position_ids.device).view(1, 1, -1)
    return entries >= _visible_before(position_ids, rate, seq_len).unsqueeze(-1)


def branch_free_hca(original):
    """A ``DeepseekV4HCACompressor.forward`` that, without a cache, always returns ``W``
    compressed entries [B, 1, W, D] and their block bias [B, 1, S, W]."""

    def forward(self, hidden_states, q_residual, position_ids, cache=None, layer_idx=None):
        if cache is not None:
            return original(self, hidden_states, q_residual, position_ids, cache, layer_idx)
        batch, seq_len, _ = hidden_states.shape
        rate = self.compress_rate
        count = _entries(seq_len, rate)
        kv = _windows(self.kv_proj(hidden_states), rate, count)
        gate = _windows(self.gate_proj(hidden_states), rate, count) + self.position_bias
        weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
        compressed = _rotated(self, self.kv_norm((kv * weights).sum(dim=2)), rate)
        hidden = _hidden(position_ids, rate, seq_len, count).unsqueeze(1)  # position_ids [1, S]
        bias = compressed.new_zeros((batch, 1, seq_len, count)).masked_fill(hidden, float("-inf"))
        return compressed.unsqueeze(1), bias

    return forward


def branch_free_indexer(original):
    """A ``DeepseekV4Indexer.forward`` that, without a cache, scores ``W`` compressed entries
    and returns each query's top ``index_topk`` [B, S, index_topk], ``-1`` where hidden."""

    def forward(self, hidden_states, q_residual, position_ids, cache=None, layer_idx=None):
        if cache is not None:
            return original(self, hidden_states, q_residual, position_ids, cache, layer_idx)
        batch, seq_len, _ = hidden_states.shape
        count = _entries(seq_len, self.compress_rate)
        compressed = _overlapped(self, hidden_states, count, self.head_dim)
        cos, sin = self.rotary_emb(
            hidden_states, position_ids=position_ids, layer_type=self.rope_layer_type
        )
        apply = sys.modules[type(self).__module__].apply_rotary_pos_emb
        q = self.q_b_proj(q_residual).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        q = apply(q, cos, sin).transpose(1, 2)
        scores = self.scorer(q, compressed, hidden_states)  # [B, S, W]
        hidden = _hidden(position_ids, self.compress_rate, seq_len, count)
        scores = F.pad(
            scores.masked_fill(hidden, float("-inf")), (0, self.index_topk), value=float("-inf")
        )
        picks = scores.topk(self.index_topk, dim=-1).indices
        seen = _visible_before(position_ids, self.compress_rate, seq_len).unsqueeze(-1)
        return torch.where(picks >= seen, torch.full_like(picks, -1), picks)

    return forward


def branch_free_csa(original):
    """A ``DeepseekV4CSACompressor.forward`` that, without a cache, always returns ``W``
    compressed entries [B, 1, W, D] and the indexer's block bias [B, 1, S, W]."""

    def forward(self, hidden_states, q_residual, position_ids, cache=None, layer_idx=None):
        if cache is not None:
            return original(self, hidden_states, q_residual, position_ids, cache, layer_idx)
        batch, seq_len, _ = hidden_states.shape
        count = _entries(seq_len, self.compress_rate)
        compressed = _overlapped(self, hidden_states, count, self.head_dim).unsqueeze(1)
        picks = self.indexer(hidden_states, q_residual, position_ids, cache, layer_idx)
        # hidden picks (-1) go to one more column, dropped after the scatter
        columns = torch.where(picks >= 0, picks, torch.full_like(picks, count))
        bias = compressed.new_full((batch, 1, seq_len, count + 1), float("-inf"))
        return compressed, bias.scatter(-1, columns.unsqueeze(1), 0.0)[..., :count]

    return forward
