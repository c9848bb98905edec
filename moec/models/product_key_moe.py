"""Adapter for MoE blocks of rank-1 experts retrieved by product keys (Doge's ``DogeCDMoE``).

Such a block holds its experts as two embeddings ``down_embed`` and ``up_embed`` [E, H]: expert
e computes ``act(x . down_embed[e]) * up_embed[e]``, a plain FFN of size 1, and its routing
weight scales that output. The router ``router_gate`` (a Linear [2K, H], K = floor(sqrt(E)))
scores two halves of K keys each; an expert is a pair of keys, scored by their sum; the top-k
pairs' scores go through a softmax (and an optional renormalisation). A shared gated FFN
(``gate_proj``, ``up_proj``, ``down_proj``) is added on every token.

Doge splits its logits into the halves with ``view(2, B*S, K)`` on [B, S, 2K], which mixes
tokens (as the family does, and so does moec), and which torch.export cannot trace with a
dynamic batch: the view's reshape algorithm compares the constant 2 with the batch and fixes
the batch at 2. The gate keeps the family's routing as exported ops, with the logits flattened
before that view, which gives the same tensor and leaves the batch free; the chosen experts and
weights go to the ``moec::moe`` op (``routing="external"``), and the shared FFN stays the
block's own ops. Nothing declares what the forward does with these parts, so the block's own
forward runs on random tokens and must match the conversion.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moec.errors import UnsupportedBlockError
from moec.ir import MoESpec, MoEWeights, moe_eager
from moec.models.conversion import Conversion
from moec.models.hf_experts import probe_plain_activation
from moec.models.layer_streaming import materialized

__all__ = ["ProductKeyGate", "ProductKeyMoEAdapter"]

SHARED = ("gate_proj", "up_proj", "down_proj")
PROBE_SHAPE = (2, 5)  # batch and sequence of the check: tokens mix across the batch
CHECK_RTOL = {torch.float32: 1e-5}  # other dtypes: HALF_RTOL
HALF_RTOL = 2e-2


class ProductKeyGate(nn.Module):
    """The block's routing and shared FFN as its own ops: called like the block on hidden
    states [B, S, H], returns ``(hidden [T, H], ids [T, k], weights [T, k], shared [B, S, H],
    router_logits [2, T, K])``."""

    def __init__(self, block: nn.Module, num_keys: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.router_gate = block.router_gate
        self.gate_proj, self.up_proj, self.down_proj = (getattr(block, n) for n in SHARED)
        self.act_fn = block.act_fn
        self.num_keys, self.top_k, self.norm_topk_prob = num_keys, top_k, norm_topk_prob

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        k = self.num_keys
        # flat first: view(2, B*S, K) of [B, S, 2K] would fix the batch at 2 in torch.export
        logits = self.router_gate(hidden_states).flatten().view(2, -1, k)
        (scores_x, scores_y), (keys_x, keys_y) = logits.topk(k, dim=-1)
        scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).flatten(-2)
        experts = (keys_x.unsqueeze(-1) * k + keys_y.unsqueeze(-2)).flatten(-2)
        top, position = scores.topk(self.top_k, dim=-1)
        weights = top.softmax(dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        x = hidden_states
        shared = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        ids = experts.gather(-1, position)
        return x.reshape(-1, x.shape[-1]), ids, weights, shared, logits


class ProductKeyMoEAdapter:
    name = "product-key"

    def convert(self, module: nn.Module) -> Conversion | None:
        if not _has_parts(module):
            return None
        e, h = module.down_embed.weight.shape
        keys, rest = divmod(module.router_gate.out_features, 2)
        if rest or not 1 <= keys * keys <= e or keys != math.isqrt(e):
            raise UnsupportedBlockError(
                f"its router_gate gives {module.router_gate.out_features} logits for {e} "
                "experts, not two halves of floor(sqrt(E)) keys; register an adapter for it "
                "(docs/adapters.md)"
            )
        top_k = getattr(module, "top_k", None)
        if not isinstance(top_k, int) or not 1 <= top_k <= keys * keys:
            raise UnsupportedBlockError(
                f"its top_k ({top_k!r}) is not a count of its {keys * keys} key pairs; "
                "register an adapter for it (docs/adapters.md)"
            )
        spec = MoESpec(
            num_experts=e,
            top_k=top_k,
            hidden_size=h,
            expert_size=1,
            routing="external",
            expert_kind="plain",
            activation=probe_plain_activation(module.act_fn, h),
        )
        gate = ProductKeyGate(module, keys, top_k, bool(getattr(module, "norm_topk_prob", False)))
        returns_logits = _check_forward(module, spec, gate)
        return Conversion(spec, _weights(module), gate=gate, returns_router_logits=returns_logits)


def _has_parts(m: nn.Module) -> bool:
    embeds = [getattr(m, n, None) for n in ("down_embed", "up_embed")]
    if not all(isinstance(t, nn.Embedding) for t in embeds):
        return False
    if embeds[0].weight.shape != embeds[1].weight.shape:
        return False
    shared = [getattr(m, n, None) for n in SHARED]
    return isinstance(getattr(m, "router_gate", None), nn.Linear) and all(
        isinstance(s, nn.Linear) for s in shared
    )


def _weights(m: nn.Module) -> MoEWeights:
    """Expert e's input row down_embed[e] as w_up [E, 1, H], its output up_embed[e] as
    w_down [E, H, 1]."""
    return MoEWeights(
        router_weight=None,
        w_up=m.down_embed.weight.detach().unsqueeze(1),
        w_down=m.up_embed.weight.detach().unsqueeze(2),
    )


def _check_forward(m: nn.Module, spec: MoESpec, gate: ProductKeyGate) -> bool:
    """Run the block's own forward on random tokens against the gate and moec's kernel; raise if
    they differ. True when the block returns ``(out, router_logits)``."""
    g = torch.Generator().manual_seed(0)
    dtype = m.down_embed.weight.dtype
    x = torch.randn(*PROBE_SHAPE, spec.hidden_size, generator=g).to(dtype)
    with torch.no_grad(), materialized(m):  # weights streamed from a checkpoint: built here
        ref = m(x)
        tokens, ids, weights, shared, logits = gate(x)
        ours = moe_eager(spec, _weights(m), tokens, ids, weights)[0].reshape(x.shape) + shared
    returns_logits = isinstance(ref, tuple)
    theirs = ref[0] if returns_logits else ref
    if not isinstance(theirs, torch.Tensor) or theirs.shape != x.shape:
        raise UnsupportedBlockError(
            f"it returns {type(ref).__name__}, not its output shaped like its input (alone or "
            "with its router logits); register an adapter for it (docs/adapters.md)"
        )
    rtol = CHECK_RTOL.get(dtype, HALF_RTOL)
    same = torch.allclose(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max()))
    if returns_logits:  # its logits, as the gate gives them: [2, T, K]
        same = same and ref[1].shape == logits.shape and torch.allclose(ref[1], logits, rtol)
    if not same:
        raise UnsupportedBlockError(
            "its forward is not product-key routing over rank-1 experts plus a shared FFN "
            "(its own forward differs from that reading on random tokens); register an "
            "adapter for it (docs/adapters.md)"
        )
    return returns_logits
