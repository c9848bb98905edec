"""Routing of the MoE IR in PyTorch: router logits to dense combine weights.

Everything here works on float32 logits of shape [B, S, E] (a 2-D [T, E] input is one sequence)
and returns dense tensors of the same shape, so that every routing family, expert-choice included,
has one representation: ``weights[b, s, e]`` is the factor of expert e's output in token (b, s),
zero where e was not chosen, and ``chosen[b, s, e]`` says whether e serves the token.
"""

from __future__ import annotations

import torch

from moec.ir.moe_spec import MoESpec

__all__ = ["expert_map_matrix", "map_experts", "near_tie_margin", "route", "router_logits"]


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Router logits in float32, as the families compute them: [..., H] -> [..., E]."""
    logits = x.float() @ weight.float().T
    return logits if bias is None else logits + bias.float()


def route(
    spec: MoESpec, logits: torch.Tensor, selection_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine weights [..., S, E] (float32) and chosen mask [..., S, E] (bool) from logits."""
    squeeze = logits.dim() == 2
    if squeeze:
        logits = logits.unsqueeze(0)
    if spec.routing == "expert_choice":
        weights, chosen = _expert_choice(spec, logits)
    else:
        weights, chosen = _topk(spec, logits, selection_bias)
    return (weights[0], chosen[0]) if squeeze else (weights, chosen)


def expert_map_matrix(spec: MoESpec) -> torch.Tensor:
    """[router experts, stored experts] float32 0/1: row r is one-hot at ``expert_map[r]``
    (all zero for a pruned router expert)."""
    matrix = torch.zeros(spec.router_experts, spec.num_experts)
    for r, e in enumerate(spec.expert_map or range(spec.num_experts)):
        if e >= 0:
            matrix[r, e] = 1.0
    return matrix


def map_experts(
    spec: MoESpec, weights: torch.Tensor, chosen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense routing over router experts -> over stored experts: the gates of router experts
    that share a stored expert add up; pruned ones drop out. Unchanged without ``expert_map``."""
    if spec.expert_map is None:
        return weights, chosen
    matrix = expert_map_matrix(spec).to(weights.device)
    return weights @ matrix, (chosen.float() @ matrix) > 0


def _scores(spec: MoESpec, logits: torch.Tensor) -> torch.Tensor:
    if spec.score == "softmax":
        return logits.softmax(dim=-1)
    if spec.score == "sigmoid":
        return logits.sigmoid()
    return logits


def _choice_values(
    spec: MoESpec, logits: torch.Tensor, scores: torch.Tensor, selection_bias: torch.Tensor | None
) -> torch.Tensor:
    """The values experts are chosen by, before any group limit: scores (or logits) + bias."""
    choice = logits if spec.topk_before_softmax else scores
    return choice if selection_bias is None else choice + selection_bias.float()


def _group_scores(spec: MoESpec, choice: torch.Tensor) -> torch.Tensor:
    """[..., E] -> [..., n_group]: each group's max, or the sum of its top two."""
    grouped = choice.unflatten(-1, (spec.n_group, spec.experts_per_group))
    if spec.group_score == "max":
        return grouped.amax(dim=-1)
    return grouped.topk(2, dim=-1).values.sum(dim=-1)


def _choice_scores(
    spec: MoESpec, logits: torch.Tensor, scores: torch.Tensor, selection_bias: torch.Tensor | None
) -> torch.Tensor:
    """Choice values with the experts outside the best ``topk_group`` groups set to -inf."""
    choice = _choice_values(spec, logits, scores, selection_bias)
    if spec.n_group == 1:
        return choice
    group_scores = _group_scores(spec, choice)
    best = group_scores.topk(spec.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, best, True)
    grouped = choice.unflatten(-1, (spec.n_group, spec.experts_per_group))
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)


def _topk(
    spec: MoESpec, logits: torch.Tensor, selection_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _scores(spec, logits)
    choice = _choice_scores(spec, logits, scores, selection_bias)
    idx = choice.topk(spec.top_k, dim=-1).indices  # [B, S, k]
    if spec.topk_before_softmax:
        w = logits.gather(-1, idx).softmax(dim=-1)
    else:
        w = scores.gather(-1, idx)
        if spec.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
    w = w * spec.routed_scaling_factor
    keep = _within_capacity(spec, idx) if spec.has_capacity else torch.ones_like(w, dtype=bool)
    weights = torch.zeros_like(logits).scatter(-1, idx, w * keep)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, keep)
    return weights, chosen


def _within_capacity(spec: MoESpec, idx: torch.Tensor) -> torch.Tensor:
    """[B, S, k] bool: whether each (token, slot) pair fits its expert's capacity.

    Pairs queue per expert in position order (token, then slot), per sequence or per batch.
    """
    b, s, k = idx.shape
    onehot = torch.nn.functional.one_hot(idx, spec.router_experts)  # [B, S, k, E]
    if spec.capacity_scope == "sequence":
        queue = onehot.reshape(b, s * k, -1).cumsum(dim=1).reshape(b, s, k, -1)
        capacity = spec.capacity(s)
    else:
        queue = onehot.reshape(b * s * k, -1).cumsum(dim=0).reshape(b, s, k, -1)
        capacity = spec.capacity(b * s)
    position = (queue * onehot).sum(dim=-1) - 1  # this pair's place in its expert's queue
    return position < capacity


def _expert_choice(spec: MoESpec, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.softmax(dim=-1)  # [B, S, E]
    capacity = spec.capacity(logits.shape[1])
    idx = scores.transpose(1, 2).topk(capacity, dim=-1).indices  # [B, E, C]
    chosen = torch.zeros_like(scores, dtype=torch.bool).transpose(1, 2).scatter(-1, idx, True)
    chosen = chosen.transpose(1, 2)
    return scores * chosen, chosen


def near_tie_margin(
    spec: MoESpec, logits: torch.Tensor, selection_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per token [..., S]: how far the routing decision is from flipping.

    For top-k routing, the gap between the k-th and (k+1)-th choice value (infinite when every
    expert is chosen); for expert-choice, twice the smallest distance of a token's score to an
    expert's cut-off between its C-th and (C+1)-th token. Capacity order is not included.
    """
    squeeze = logits.dim() == 2
    if squeeze:
        logits = logits.unsqueeze(0)
    if spec.routing == "expert_choice":
        scores = logits.softmax(dim=-1)
        s = scores.shape[1]
        c = spec.capacity(s)
        if c >= s:
            margin = torch.full(scores.shape[:2], float("inf"))
        else:
            top = scores.transpose(1, 2).topk(c + 1, dim=-1).values  # [B, E, C+1]
            cut = (top[..., c - 1] + top[..., c]) / 2  # [B, E]
            margin = 2 * (scores - cut.unsqueeze(1)).abs().amin(dim=-1)
    else:
        choice = _choice_scores(spec, logits, _scores(spec, logits), selection_bias)
        if spec.top_k >= spec.router_experts:
            margin = torch.full(choice.shape[:2], float("inf"))
        else:
            top = choice.topk(spec.top_k + 1, dim=-1).values
            margin = top[..., spec.top_k - 1] - top[..., spec.top_k]
            # Group choice can be close even when the k-th gap is wide.
            if spec.n_group > 1 and spec.topk_group < spec.n_group:
                margin = margin.minimum(_group_margin(spec, logits, selection_bias))
    return margin[0] if squeeze else margin


def _group_margin(
    spec: MoESpec, logits: torch.Tensor, selection_bias: torch.Tensor | None
) -> torch.Tensor:
    choice = _choice_values(spec, logits, _scores(spec, logits), selection_bias)
    top = _group_scores(spec, choice).topk(spec.topk_group + 1, dim=-1).values
    return top[..., spec.topk_group - 1] - top[..., spec.topk_group]
