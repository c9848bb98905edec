"""The ``gather`` lowering: each expert runs on its own tokens only. Standard ops only.

Where every token has exactly k pairs (top-k, or the family's own router, which may repeat an
expert: a pair per slot; no capacity, no merged experts), one ``TopK`` over the flat [T*k]
expert ids sorts the (token, expert) pairs into expert order; otherwise one ``NonZero`` of the
transposed routing mask lists them grouped by expert. One ``Split`` of those token ids by the
per-expert counts hands each expert its tokens, and each expert ``Gather``s its own rows: no
[T*k, H] copy of every pair's row, and each expert's rows are still in cache for its MatMul.
Each expert runs one MatMul for its gate and up projections together ([H, 2I], its slices of
the stacked weights side by side, folded into one initializer by the optimizer).

ONNX Runtime spends a fixed time per node, even on an expert with no rows, so at a few tokens
the per-expert nodes are a large part of a many-expert block's time. In a block of more than
``PER_EXPERT_ACTIVATION_MAX`` experts the first projections are therefore concatenated, the
activation runs once over every expert's rows, a second ``Split`` hands the hidden rows back,
and each expert runs its down MatMul: two nodes per expert. A block of few, wide experts runs
the activation on each expert's own rows instead (three nodes more per expert, but no copy of
the [T*k, 2I] and [T*k, I] rows). The measurements behind both choices are in
docs/performance.md.

The ``counting`` lowering is this one with the pairs grouped by a counting sort instead of
``TopK`` (TensorRT takes a TopK only with k < 3840, and k here is the number of pairs): each
pair's place is its expert's offset plus its rank among that expert's pairs (a one-hot
``CumSum``), and one ``ScatterElements`` without reduction writes the order from the places.

Combining does not scatter. Sorted pairs come back by the inverse of the sort (a second
``TopK``, or the places themselves), k rows per token. Otherwise token t's output from expert
e sits in Y at ``offset_e + (number of tokens before t routed to e)``, so every token gathers
its k rows of Y and sums them with its routing weights. (ONNX Runtime 1.32's CPU
``ScatterND`` with ``reduction="add"`` races when indices repeat and more than one thread runs
it.) Expert-choice routing, with no fixed k per token, adds each expert's rows to theirs and
writes them back with its own ``ScatterND`` (no reduction, which TensorRT refuses: an expert's
tokens never repeat).

A ``gate_on_input`` block scales each expert's gathered rows by their pairs' weights and
combines the outputs with weight 1.

Exact, no padding, the FLOPs of the experts actually chosen; shapes are data-dependent.
"""

from __future__ import annotations

from moec.compiler.lower_routing import lower_routing, pair_ids, scatter_ids, topk_pairs
from moec.compiler.onnx_ops import (
    BOOL,
    FLOAT,
    INT64,
    activation,
    const_f,
    const_i,
    finish_moe_output,
    gated_activation,
    ones_like,
    op,
    post_expert_norm,
    reshape_chosen,
    to_3d,
)
from moec.ir import MoESpec

__all__ = ["grouped_experts_onnx", "lower_moe_counting", "lower_moe_gather"]

PER_EXPERT_ACTIVATION_MAX = 16  # experts in a block that still run the activation one by one


def _pick(w: dict, name: str, e: int):
    """Expert ``e``'s slice of the stacked tensor ``name`` (None if the block has none)."""
    t = w.get(name)
    return None if t is None else op.Gather(t, op.Constant(value_int=e), axis=0)


def _first_projection(spec: MoESpec, w: dict, e: int):
    """Expert ``e``'s first projection: ([H, n] weight, [n] bias or None), n = 2I for gated
    experts (gate columns, then up), else I."""
    names = ("w_gate", "w_up") if spec.expert_kind == "gated" else ("w_up",)
    weights = [op.Transpose(_pick(w, n, e), perm=[1, 0]) for n in names]
    weight = weights[0] if len(weights) == 1 else op.Concat(*weights, axis=1)
    biases = [_pick(w, n.replace("w_", "b_"), e) for n in names]
    if all(b is None for b in biases):
        return weight, None
    like = next(b for b in biases if b is not None)
    biases = [op.Sub(like, like) if b is None else b for b in biases]  # zeros where absent
    return weight, biases[0] if len(biases) == 1 else op.Concat(*biases, axis=0)


def _linear(x, weight, bias):
    y = op.MatMul(x, weight)
    return y if bias is None else op.Add(y, bias)


def grouped_experts_onnx(
    spec: MoESpec, w: dict, x2, tokens, counts, parts: int, gates=None
) -> list:
    """Every expert on its tokens (``tokens`` [P] grouped by expert, ``counts`` [E] of them per
    expert, rows of ``x2`` [T, H]) -> each expert's [n_e, H] output. ``gates`` [P] (in the
    order of ``tokens``): each row is scaled by its pair's gate first (``gate_on_input``)."""
    rows = [op.Gather(x2, part, axis=0) for part in _split(tokens, counts, parts)]
    if gates is not None:
        scales = _split(op.Unsqueeze(gates, const_i([-1])), counts, parts)
        rows = [op.Mul(r, g) for r, g in zip(rows, scales, strict=True)]
    first = [_linear(r, *_first_projection(spec, w, e)) for e, r in enumerate(rows)]
    if parts <= PER_EXPERT_ACTIVATION_MAX:
        hidden = [_hidden(spec, f) for f in first]
    else:
        hidden = _split(_hidden(spec, op.Concat(*first, axis=0)), counts, parts)
    return [
        post_expert_norm(
            spec,
            _linear(h, op.Transpose(_pick(w, "w_down", e), perm=[1, 0]), _pick(w, "b_down", e)),
            _pick(w, "post_norm_weight", e),
        )
        for e, h in enumerate(hidden)
    ]


def _hidden(spec: MoESpec, first):
    """The hidden rows [n, I] from the first projection's output [n, 2I] (gated) or [n, I]."""
    if spec.expert_kind != "gated":
        return activation(spec.activation, first)
    size = spec.expert_size
    gate, up = op.Split(first, const_i([size, size]), axis=1, num_outputs=2)
    return gated_activation(spec, gate, up)


def lower_moe_gather(spec: MoESpec, x, w: dict, counting: bool = False):
    """x [B, S, H] or [T, H] -> (out like x, chosen [..., E] bool). ``counting``: group the
    pairs by a counting sort, not TopK."""
    x2 = op.Reshape(x, const_i([-1, spec.hidden_size]))
    pairs = topk_pairs(spec, to_3d(x), w)
    if pairs is not None:
        y, chosen = _sorted_pairs(spec, w, x2, *pairs, counting=counting)
    else:
        y, chosen = _masked_pairs(spec, w, x, x2)
    y = finish_moe_output(spec, y, x2, w)
    return op.Reshape(y, op.Shape(x)), reshape_chosen(chosen, x, spec.num_experts)


def lower_moe_counting(spec: MoESpec, x, w: dict):
    """`lower_moe_gather` with the pairs grouped by a counting sort (no TopK over them)."""
    return lower_moe_gather(spec, x, w, counting=True)


def _masked_pairs(spec: MoESpec, w: dict, x, x2):
    """Any routing: the pairs are the routing mask's nonzeros, grouped by expert.
    -> (y [T, H], chosen [..., E] float 0/1)"""
    e_count = spec.num_experts
    weights, chosen = lower_routing(spec, to_3d(x), w)
    combine = op.CastLike(op.Reshape(weights, const_i([-1, e_count])), x)  # [T, E]
    chosen2 = op.Reshape(chosen, const_i([-1, e_count]))  # [T, E] float 0/1
    pairs = op.NonZero(op.Transpose(chosen2, perm=[1, 0]))  # [2, P]: (expert, token) rows
    tokens = op.Gather(pairs, op.Constant(value_int=1), axis=0)  # [P], grouped by expert
    counts = op.Cast(op.ReduceSum(chosen2, const_i([0]), keepdims=0), to=INT64)  # [E]
    gates = None
    if spec.gate_on_input:  # each pair's weight scales its row; the outputs add with weight 1
        gates = op.GatherND(op.Transpose(combine, perm=[1, 0]), op.Transpose(pairs, perm=[1, 0]))
        combine = op.CastLike(chosen2, x2)
    outputs = grouped_experts_onnx(spec, w, x2, tokens, counts, e_count, gates)
    if spec.routing == "expert_choice":
        y = _scatter_per_expert(x2, combine, _split(tokens, counts, e_count), outputs)
    else:
        y = _gather_back(spec, w, x2, combine, chosen2, outputs)
    return y, chosen


def _sorted_pairs(spec: MoESpec, w: dict, x2, ids, weights, k: int, counting: bool):
    """Exactly k pairs per token: group the pairs by sorting their expert ids.

    Sorting the flat [T*k] ids (``TopK`` over all of them) groups the pairs by expert; sorting
    that order again inverts it, so gathering the experts' output rows by the inverse puts each
    token's k rows side by side. Neither needs the dense [T, E] combine weights, the positions
    ``_gather_back`` computes, or a stable sort. -> (y [T, H], chosen [..., E] float 0/1)
    """
    e_count = spec.num_experts
    flat = op.Reshape(ids, const_i([-1]))  # [P], token-major
    pair_count = op.Shape(flat)
    if counting:
        order, inverse = _counting_sort(flat, e_count)
    else:
        _, order = op.TopK(flat, pair_count, axis=0, largest=0)  # [P], grouped by expert
        _, inverse = op.TopK(order, pair_count, axis=0, largest=0)
    tokens = op.Div(order, const_i([k]))
    pairs = scatter_ids(ids, ones_like(ids), e_count)  # [..., E]: slots per expert
    counts = op.ReduceSum(op.Reshape(pairs, const_i([-1, e_count])), const_i([0]), keepdims=0)
    chosen = op.Min(pairs, const_f(1.0))
    flat_weights = op.Reshape(op.CastLike(weights, x2), const_i([-1]))  # [P], token-major
    gates = op.Gather(flat_weights, order, axis=0) if spec.gate_on_input else None
    counts = op.Cast(counts, to=INT64)
    outputs = grouped_experts_onnx(spec, w, x2, tokens, counts, e_count, gates)
    by_token = op.Gather(op.Concat(*outputs, axis=0), inverse, axis=0)  # [P, H], token-major
    by_token = op.Reshape(by_token, const_i([-1, k, spec.hidden_size]))
    if spec.gate_on_input:
        return op.ReduceSum(by_token, const_i([1]), keepdims=0), chosen
    gate = op.Reshape(flat_weights, const_i([-1, k, 1]))
    return op.ReduceSum(op.Mul(by_token, gate), const_i([1]), keepdims=0), chosen


def _counting_sort(flat, e_count: int):
    """(order, places) of the expert ids ``flat`` [P]: ``order`` lists the pairs grouped by
    expert (in pair order within one), ``places`` [P] is where each pair lands in it. Counted
    in float32, exact up to 2^24 pairs."""
    experts = const_i(list(range(e_count)))
    one_hot = op.Cast(op.Equal(op.Unsqueeze(flat, const_i([-1])), experts), to=FLOAT)  # [P, E]
    zero = op.Constant(value_int=0)
    ahead = op.ReduceSum(op.Mul(op.CumSum(one_hot, zero), one_hot), const_i([1]), keepdims=0)
    counts = op.ReduceSum(one_hot, const_i([0]), keepdims=0)  # [E]
    offsets = op.Sub(op.CumSum(counts, zero), counts)  # exclusive
    places = op.Cast(
        op.Add(op.Gather(offsets, flat, axis=0), op.Sub(ahead, const_f(1.0))), to=INT64
    )
    pairs = op.Range(zero, op.Size(flat), op.Constant(value_int=1))
    order = op.ScatterElements(op.Sub(places, places), places, pairs, axis=0)
    return order, places


def _split(values, counts, parts: int) -> list:
    """``values`` [P, ...] cut into ``parts`` pieces of ``counts`` [parts] rows."""
    if parts == 1:
        return [values]
    return list(op.Split(values, counts, axis=0, num_outputs=parts))


def _gather_back(spec: MoESpec, w: dict, x2, combine, chosen2, outputs):
    """Sum each token's k expert outputs, found in the concatenated outputs by position."""
    ids, _ = pair_ids(spec, w, chosen2)  # [T, k]
    counts = op.ReduceSum(chosen2, const_i([0]), keepdims=1)  # [1, E]
    offsets = op.Sub(op.CumSum(counts, op.Constant(value_int=1)), counts)  # exclusive
    rank = op.Sub(op.CumSum(chosen2, op.Constant(value_int=0)), const_f(1.0))  # [T, E]
    position = op.Cast(op.Add(rank, offsets), to=INT64)  # row of Y holding (t, e)
    pair_chosen = op.Cast(op.GatherElements(chosen2, ids, axis=1), to=BOOL)  # [T, k]
    spare = op.Cast(op.ReduceSum(counts, keepdims=0), to=INT64)  # index of a zero row
    rows = op.Where(pair_chosen, op.GatherElements(position, ids, axis=1), spare)
    zero_row = op.CastLike(op.ConstantOfShape(const_i([1, spec.hidden_size])), x2)
    everything = op.Concat(*outputs, zero_row, axis=0)  # [P + 1, H]
    gathered = op.Gather(everything, rows, axis=0)  # [T, k, H]
    pair_weight = op.Mul(
        op.GatherElements(combine, ids, axis=1), op.CastLike(pair_chosen, x2)
    )  # [T, k]
    return op.ReduceSum(
        op.Mul(gathered, op.Unsqueeze(pair_weight, const_i([-1]))), const_i([1]), keepdims=0
    )


def _scatter_per_expert(x2, combine, token_lists, outputs):
    y = op.CastLike(op.ConstantOfShape(op.Shape(x2)), x2)
    for e, (tokens, out) in enumerate(zip(token_lists, outputs, strict=True)):
        gate = op.Gather(op.Gather(combine, op.Constant(value_int=e), axis=1), tokens, axis=0)
        update = op.Mul(out, op.Unsqueeze(gate, const_i([-1])))
        rows = op.Unsqueeze(tokens, const_i([-1]))
        y = op.ScatterND(y, rows, op.Add(op.GatherND(y, rows), update))
    return y
