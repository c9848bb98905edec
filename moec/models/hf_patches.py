"""Export-time rewrites of transformers code that ONNX cannot express, applied only while moec
captures a model (the eager model verification compares against runs the original code).

Qwen4-Exp's QSA indexer selects key blocks per query in a Python loop over the batch and the
queries (`moec.models.qsa_indexer` computes the same selection for all queries at once).

DeepSeek-V2 and Llama 4 compute rotary embeddings with complex tensors (``torch.polar``,
``view_as_complex``); ONNX has no complex type. The rewrite carries each frequency as a real
(cos, sin) pair in a trailing dimension of 2 and does the complex product by hand:
``(a + ib)(c + id) = (ac - bd) + i(ad + bc)``, the same arithmetic.

MiniMax's lightning attention loops over blocks of ``block_size`` tokens; export unrolls the
loop into a graph for one sequence length only. Without a cache the rewrite computes it in its
parallel form, one masked product over the whole sequence (see `_parallel_lightning`).

Kolibri 1.1's indexer loops in Python over the values of a tensor (the distinct first visible
key of its queries), which export cannot trace; the rewrite selects for every query at once
(`moec.models.kolibri_indexer`).

Doge's dynamic attention mask branches on the key length; the rewrite computes both sides as
one top-k (see `_branch_free_dynamic_mask`).

Inkling-2's dynamic short convolution reshapes a flipped ``unfold`` view, from whose strides
export derives a minimum length; the rewrite copies the windows first (`_copied_unfold`).

DeepSeek-V4's KV compressors and indexer branch on how many complete windows of tokens there
are; the rewrites compress two padded windows more, hidden from every query, for any length
(`moec.models.deepseek_v4_compressors`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from moec.models.deepseek_v4_compressors import (
    branch_free_csa,
    branch_free_hca,
    branch_free_indexer,
)
from moec.models.kolibri_indexer import loop_free_indexer
from moec.models.qsa_indexer import select_tokens

__all__ = ["export_patches"]


def _rotary_forward(self, x, position_ids):
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


def _rotate_pairs(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """x [..., D] as D/2 complex numbers (re, im interleaved) times cis [..., D/2, 2]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = cis[..., 0], cis[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def _deepseek_v2_apply_rotary_emb(xq, xk, freqs_cis):
    cis = freqs_cis.unsqueeze(1)  # [B, 1, S, D/2, 2] against q/k [B, heads, S, D]
    return _rotate_pairs(xq, cis).type_as(xq), _rotate_pairs(xk, cis).type_as(xk)


def _llama4_apply_rotary_emb(xq, xk, freqs_cis):
    cis = freqs_cis[:, :, None]  # [B, S, 1, D/2, 2] against q/k [B, S, heads, D]
    return _rotate_pairs(xq, cis).type_as(xq), _rotate_pairs(xk, cis).type_as(xk)


# rotary-embedding class -> the function of its module that consumes its output
COMPLEX_ROTARY = {
    "DeepseekV2RotaryEmbedding": _deepseek_v2_apply_rotary_emb,
    "Llama4TextRotaryEmbedding": _llama4_apply_rotary_emb,
}


def _parallel_lightning(original):
    """A lightning-attention forward that, without a cache, computes
    ``out = ((Q K^T) * D) V`` with ``D[h, i, j] = exp(-slope_h (i - j))`` for j <= i, else 0:
    the sum the model's blocks accumulate (inside a block by its diagonal decay, across blocks
    by the decayed K^T V state), for any sequence length. Also returns that state [B, H, D, D]
    after the last token, as the model does; with a cache it runs ``original``."""

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        if cache is not None:
            return original(
                self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs
            )
        batch, seq, _ = hidden_states.shape
        heads, dim = self.num_attention_heads, self.head_dim
        masked = sys.modules[type(self).__module__].apply_mask_to_padding_states
        qkv = masked(self.act_fn(self.qkv_proj(hidden_states)), attention_mask)
        qkv = qkv.reshape(batch, seq, heads, 3 * dim).transpose(1, 2)
        q, k, v = torch.split(qkv, dim, dim=3)  # [B, H, S, D] each
        position = torch.arange(seq, device=hidden_states.device)
        distance = (position[:, None] - position[None, :]).to(self.slope_rate.dtype)
        decay = torch.where(distance >= 0, -self.slope_rate * distance, float("-inf")).exp()
        out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * decay, v)
        to_end = torch.exp(-self.slope_rate * (seq - 1 - position)[:, None])  # [H, S, 1]
        state = torch.matmul((k * to_end).transpose(-1, -2), v)
        out = self.norm(out.transpose(1, 2).reshape(batch, seq, heads * dim))
        out = F.sigmoid(self.output_gate(hidden_states)) * out
        return self.out_proj(out), state

    return forward


TENSOR_UNFOLD = torch.Tensor.unfold


def _copied_unfold(original):
    """Inkling-2's dynamic short convolution flips an ``unfold`` view (overlapping strides)
    and reshapes it; torch.export derives from those strides a guard that the sequence is at
    least the kernel size. The same windows, copied out of the view first, need no guard."""

    def unfold_copy(x, dimension, size, step):
        return TENSOR_UNFOLD(x, dimension, size, step).contiguous()

    def forward(self, *args, **kwargs):
        with mock.patch.object(torch.Tensor, "unfold", unfold_copy):
            return original(self, *args, **kwargs)

    return forward


COPIED_UNFOLD = (
    "forward",
    _copied_unfold,
    "its convolution windows copied out of an unfold view (no minimum length)",
)


def _branch_free_dynamic_mask(original):
    """Doge's dynamic mask keeps each query's top ``keep_window_size`` keys only when there are
    more keys than that: a branch on the key length, which export fixes to the example's side.
    Keeping the top min(window, keys) is the same mask for any length (with no more keys than
    the window, all are kept); the rest of the mask is the original's, its branch not taken."""

    def prepare_dynamic_mask(
        self, hidden_states, dt_states, keep_window_size=2048, attention_mask=None
    ):
        mask = original(self, hidden_states, dt_states, sys.maxsize, attention_mask)
        keep = torch.sym_min(keep_window_size, mask.shape[-1])
        kept = torch.topk(mask, keep, dim=-1, sorted=False).indices
        active = torch.zeros_like(mask).scatter(-1, kept, 1.0)
        return mask.masked_fill(active == 0.0, torch.finfo(hidden_states.dtype).min)

    return prepare_dynamic_mask


# class -> (method, its export-friendly rewrite built from the original, what the note says)
METHODS = {
    "MiniMaxLightningAttention": (
        "forward",
        _parallel_lightning,
        "its loop over blocks as one masked product",
    ),
    "Qwen4ExpTextQSAIndexer": (
        "_select_tokens",
        lambda original: select_tokens,
        "QSA indexer token selection computed for all queries at once",
    ),
    "Kolibri1_1Indexer": (
        "forward",
        loop_free_indexer,
        "its loop over query groups as batched selection",
    ),
    "DogeAttention": (
        "prepare_dynamic_mask",
        _branch_free_dynamic_mask,
        "its dynamic mask's branch on the key length as a top-k of at most the window",
    ),
    "Inkling2DynamicShortConvolution": COPIED_UNFOLD,
    "Inkling2LoopDynamicShortConvolution": COPIED_UNFOLD,
    "DeepseekV4HCACompressor": (
        "forward",
        branch_free_hca,
        "its branches on the window count as two padded windows more, hidden",
    ),
    "DeepseekV4CSACompressor": (
        "forward",
        branch_free_csa,
        "its branches on the window count as two padded windows more, hidden",
    ),
    "DeepseekV4Indexer": (
        "forward",
        branch_free_indexer,
        "its branches on the window count as a top-k of a constant k",
    ),
}


@contextmanager
def export_patches(model: nn.Module) -> Iterator[list[str]]:
    """Apply the rewrites this model needs; yields the names of those applied."""
    applied: list[str] = []
    with ExitStack() as stack:
        for cls in {type(m) for m in model.modules()}:
            if cls.__name__ in METHODS and hasattr(cls, METHODS[cls.__name__][0]):
                method, rewrite, note = METHODS[cls.__name__]
                stack.enter_context(mock.patch.object(cls, method, rewrite(getattr(cls, method))))
                applied.append(f"{cls.__name__}: {note}")
            apply = COMPLEX_ROTARY.get(cls.__name__)
            module = sys.modules.get(cls.__module__)
            if apply is None or not hasattr(module, "apply_rotary_emb"):
                continue
            stack.enter_context(mock.patch.object(cls, "forward", _rotary_forward))
            stack.enter_context(mock.patch.object(module, "apply_rotary_emb", apply))
            applied.append(f"{cls.__name__}: complex rotary embedding as real (cos, sin) pairs")
        yield applied
