"""A small causal transformer LM with an MoE FFN in every layer, for whole-model compiles."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyMoELM"]


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, s, h))

    def forward_cached(self, x, past_key, past_value, allowed):
        """With the keys and values of earlier tokens [B, heads, P, head_dim]; ``allowed``
        [B, 1, S, P + S] says which keys each query attends. Returns (y, keys, values)."""
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        keys = torch.cat([past_key, k.transpose(1, 2)], dim=2)
        values = torch.cat([past_value, v.transpose(1, 2)], dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=allowed)
        return self.out(y.transpose(1, 2).reshape(b, s, h)), keys, values


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, moe: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads)
        self.moe_norm = RMSNorm(hidden)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.moe_norm(x))

    def forward_cached(self, x, past_key, past_value, allowed):
        y, keys, values = self.attn.forward_cached(self.attn_norm(x), past_key, past_value, allowed)
        x = x + y
        return x + self.moe(self.moe_norm(x)), keys, values


class TinyMoELM(nn.Module):
    """input_ids [B, S] (int64, < vocab_size, S <= max_positions) -> logits [B, S, vocab_size];
    `forward_cached` runs the same model with a KV cache (`moec.models.kv_cache`)."""

    def __init__(
        self,
        make_moe: Callable[[int], nn.Module],
        vocab_size: int = 256,
        hidden: int = 32,
        layers: int = 2,
        heads: int = 4,
        max_positions: int = 64,
    ):
        super().__init__()
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.embed = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, heads, make_moe(hidden)) for _ in range(layers)
        )
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.position(positions)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))

    def forward_cached(self, input_ids, attention_mask, position_ids, *past):
        """(logits, *present) from the new tokens, a mask over past and new tokens (0: padding),
        their positions, and each layer's past keys and values (alternating)."""
        new, total = input_ids.shape[1], attention_mask.shape[1]
        key_at = torch.arange(total, device=input_ids.device)
        query_at = key_at[total - new :, None]
        # causal over the attended keys; each token also sees itself, so no row is empty
        allowed = ((key_at <= query_at) & attention_mask[:, None, None, :].bool()) | (
            key_at == query_at
        )
        h = self.embed(input_ids) + self.position(position_ids)
        present = []
        for i, layer in enumerate(self.layers):
            h, keys, values = layer.forward_cached(h, past[2 * i], past[2 * i + 1], allowed)
            present += [keys, values]
        return (self.lm_head(self.norm(h)), *present)
