"""Routing of a ``moec::moe`` node in standard ONNX ops (the same math as `moec.ir.routing`).

``lower_routing(spec, x3, w) -> (weights, chosen)``: x3 [B, S, H]; weights [B, S, E] float32
dense combine weights (zero where an expert is not chosen), chosen [B, S, E] float32 0/1, over the
stored experts (routing runs over the router's experts, then ``expert_map`` maps them). For
external routing the shapes follow the given ids ([..., k] -> [..., E]) instead.
"""

from __future__ import annotations

import onnx

from moec.compiler.onnx_ops import (
    FLOAT,
    ceil_scaled,
    const_f,
    const_i,
    linear,
    ones_like,
    op,
)
from moec.ir import MoESpec
from moec.ir.routing import expert_map_matrix

__all__ = [
    "lower_router_logits",
    "lower_routing",
    "pair_ids",
    "scatter_chosen",
    "scatter_ids",
    "topk_pairs",
]


def lower_router_logits(x, w: dict):
    """Router logits in float32: [..., H] -> [..., E]."""
    bias = w.get("router_bias")
    return linear(
        op.Cast(x, to=FLOAT),
        op.Cast(w["router_weight"], to=FLOAT),
        None if bias is None else op.Cast(bias, to=FLOAT),
    )


def lower_routing(spec: MoESpec, x3, w: dict):
    if spec.routing == "external":
        weights, chosen = _external(spec, w)
    else:
        logits = lower_router_logits(x3, w)
        if spec.routing == "expert_choice":
            weights, chosen = _expert_choice(spec, logits)
        else:
            weights, chosen = _topk(spec, logits, w.get("selection_bias"))
    if spec.expert_map is None:
        return weights, chosen
    # merged / pruned experts: gates of router experts sharing a stored expert add up
    matrix = op.Constant(value=onnx.numpy_helper.from_array(expert_map_matrix(spec).numpy()))
    return op.MatMul(weights, matrix), op.Min(op.MatMul(chosen, matrix), const_f(1.0))


def pair_ids(spec: MoESpec, w: dict, chosen2):
    """([T, k] stored-expert ids of each token's pairs, the router's k) for top-k routing: the
    chosen columns of ``chosen2`` [T, E], one per distinct expert. A token may have fewer than
    k (merged experts, or a family's router repeating an expert, whose weights the dense
    routing has summed): check ``chosen2``."""
    top_k = _router_k(spec, w)
    _, ids = op.TopK(chosen2, const_i([min(top_k, spec.num_experts)]), axis=-1)
    return ids, top_k


def scatter_chosen(logits, idx, values):
    """Dense [..., E] float: ``values`` [..., k] at expert indices ``idx``, zero elsewhere."""
    return _scatter(op.Shape(logits), idx, values)


def scatter_ids(ids, values, num_experts: int):
    """``values`` [..., k] summed per expert id: [..., k] -> [..., num_experts]. The ids of a
    family's own router may repeat an expert within a token (hash routing); each slot counts.
    (ONNX Runtime 1.32's CPU ``ScatterElements`` adds repeated indices exactly with two threads:
    200 runs of [8192, 8] ids over 4 of 64 columns matched NumPy; its ``ScatterND`` races.)"""
    shape = op.Concat(op.Shape(ids, end=-1), const_i([num_experts]), axis=0)
    return _scatter(shape, ids, values, reduction="add")


def _scatter(shape, idx, values, reduction: str = "none"):
    return op.ScatterElements(op.ConstantOfShape(shape), idx, values, axis=-1, reduction=reduction)


def _scores(spec: MoESpec, logits):
    if spec.score == "softmax":
        return op.Softmax(logits, axis=-1)
    if spec.score == "sigmoid":
        return op.Sigmoid(logits)
    return logits


def topk_pairs(spec: MoESpec, x3, w: dict):
    """(ids [..., k] int64, weights [..., k] float32, k) where every token keeps exactly k
    pairs (top-k, whose experts are distinct, or the family's own router, which may repeat
    one; no capacity, no merged experts); None otherwise."""
    if spec.expert_map is not None or spec.has_capacity:
        return None
    if spec.routing == "external":
        return *_external_pairs(w), _router_k(spec, w)
    if spec.routing != "topk":
        return None
    logits = lower_router_logits(x3, w)
    return *_topk_pairs(spec, logits, w.get("selection_bias")), _router_k(spec, w)


def _router_k(spec: MoESpec, w: dict) -> int:
    """Experts per token of top-k or external routing."""
    return int(w["routed_ids"].shape[-1]) if spec.routing == "external" else spec.top_k


def _topk_pairs(spec: MoESpec, logits, selection_bias):
    """([..., k] expert ids, [..., k] float32 weights) before capacity."""
    scores = _scores(spec, logits)
    choice = logits if spec.topk_before_softmax else scores
    if selection_bias is not None:
        choice = op.Add(choice, op.Cast(selection_bias, to=FLOAT))
    if spec.n_group > 1:
        choice = _limit_to_groups(spec, choice)
    _, idx = op.TopK(choice, const_i([spec.top_k]), axis=-1)
    if spec.topk_before_softmax:
        weight = op.Softmax(op.GatherElements(logits, idx, axis=-1), axis=-1)
    else:
        weight = op.GatherElements(scores, idx, axis=-1)
        if spec.norm_topk_prob:
            weight = op.Div(weight, op.ReduceSum(weight, const_i([-1]), keepdims=1))
    if spec.routed_scaling_factor != 1.0:
        weight = op.Mul(weight, const_f(spec.routed_scaling_factor))
    return idx, weight


def _topk(spec: MoESpec, logits, selection_bias):
    idx, weight = _topk_pairs(spec, logits, selection_bias)
    if spec.has_capacity:
        keep = _within_capacity(spec, idx)
        weight = op.Mul(weight, keep)
    else:
        keep = ones_like(idx)
    return scatter_chosen(logits, idx, weight), scatter_chosen(logits, idx, keep)


def _limit_to_groups(spec: MoESpec, choice):
    grouped = op.Reshape(choice, const_i([0, 0, spec.n_group, spec.experts_per_group]))
    if spec.group_score == "max":
        group_scores = op.ReduceMax(grouped, const_i([-1]), keepdims=0)
    else:
        top2, _ = op.TopK(grouped, const_i([2]), axis=-1)
        group_scores = op.ReduceSum(top2, const_i([-1]), keepdims=0)
    _, best = op.TopK(group_scores, const_i([spec.topk_group]), axis=-1)
    allowed = scatter_chosen(group_scores, best, ones_like(best))
    allowed = op.Unsqueeze(op.Greater(allowed, const_f(0.5)), const_i([-1]))
    masked = op.Where(allowed, grouped, const_f(float("-inf")))
    return op.Reshape(masked, const_i([0, 0, spec.router_experts]))


def _within_capacity(spec: MoESpec, idx):
    """[B, S, k] float 0/1: whether each (token, slot) pair fits its expert's capacity."""
    experts = op.Range(_scalar_i(0), _scalar_i(spec.router_experts), _scalar_i(1))
    onehot = op.Cast(op.Equal(op.Unsqueeze(idx, const_i([-1])), experts), to=FLOAT)  # [B,S,k,E]
    if spec.capacity_scope == "sequence":
        queue = op.CumSum(op.Reshape(onehot, const_i([0, -1, spec.router_experts])), _scalar_i(1))
        tokens = op.Shape(idx, start=1, end=2)
    else:
        queue = op.CumSum(op.Reshape(onehot, const_i([1, -1, spec.router_experts])), _scalar_i(1))
        tokens = op.ReduceProd(op.Shape(idx, start=0, end=2), keepdims=1)
    queue = op.Reshape(queue, op.Shape(onehot))
    position = op.Sub(op.ReduceSum(op.Mul(queue, onehot), const_i([-1]), keepdims=0), const_f(1.0))
    capacity = op.Cast(_capacity(spec, tokens), to=FLOAT)
    return op.Cast(op.Less(position, capacity), to=FLOAT)


def _capacity(spec: MoESpec, tokens):
    """Int64 [1]: `MoESpec.capacity` of ``tokens`` (int64 [1]), in double as Python computes it."""
    if spec.expert_capacity is not None:
        return const_i([spec.expert_capacity])
    factor = 1.0 if spec.capacity_factor is None else spec.capacity_factor
    return ceil_scaled(tokens, factor, spec.top_k, spec.router_experts)


def _scalar_i(value: int):
    return op.Constant(value_int=value)


def _external(spec: MoESpec, w: dict):
    """Routing the block's own router computed: (ids, weights) [..., k] scattered to [..., E]
    (the weights of a repeated expert add up)."""
    ids, weights = _external_pairs(w)
    e = spec.router_experts
    return scatter_ids(ids, weights, e), op.Min(scatter_ids(ids, ones_like(ids), e), const_f(1.0))


def _external_pairs(w: dict):
    """The block's own router's (ids, float32 weights) [..., k]."""
    return w["routed_ids"], op.Cast(w["routed_weights"], to=FLOAT)


def _expert_choice(spec: MoESpec, logits):
    scores = op.Softmax(logits, axis=-1)  # [B, S, E]
    by_expert = op.Transpose(scores, perm=[0, 2, 1])  # [B, E, S]
    tokens = op.Shape(scores, start=1, end=2)
    capacity = op.Min(tokens, _capacity(spec, tokens))
    _, idx = op.TopK(by_expert, capacity, axis=-1)  # [B, E, C]
    ones = ones_like(idx)
    chosen = op.Transpose(scatter_chosen(by_expert, idx, ones), perm=[0, 2, 1])
    return op.Mul(scores, chosen), chosen
