"""The ``capacity`` lowering: static-shape expert buffers [E, C, H] and batched MatMuls.

For runtimes that need shapes known from the input shapes alone (TensorRT without
data-dependent shapes, CUDA graphs). Each expert has ``C = min(T, ceil(F * T * k / E))`` slots
(F = ``spec.lowering_capacity_factor``, T the tokens of the call); the (token, slot) pairs routed
to it take them in token order, and pairs past C are dropped (contribute nothing). Exact when no
expert receives more than C pairs.

Dispatch without one-hot matmuls: each kept pair's slot ``e * C + position`` is scattered into a
slot -> token table (dropped pairs go to a spare slot), experts read their inputs with one Gather
from the tokens padded by a zero row, and each token gathers its k outputs back. Copies are
O((E*C + T*k) * H); the expert FLOPs are those of E*C rows. A ``gate_on_input`` block scales
each slot's row by its pair's weight (scattered like the tokens) and combines with weight 1.
"""

from __future__ import annotations

from moec.compiler.lower_routing import lower_routing, pair_ids
from moec.compiler.onnx_ops import (
    FLOAT,
    INT64,
    activation,
    batched_linear,
    ceil_scaled,
    const_f,
    const_i,
    finish_moe_output,
    gated_activation,
    op,
    post_expert_norm,
    reshape_chosen,
    to_3d,
)
from moec.ir import MoESpec

__all__ = ["lower_moe_capacity", "unsupported_reasons"]


def unsupported_reasons(spec: MoESpec) -> list[str]:
    """Why capacity slots cannot compute this block (empty: they can)."""
    if spec.routing == "expert_choice":
        return ["expert-choice routing has no fixed k per token to give capacity slots"]
    return []


def _slots(spec: MoESpec, tokens, top_k: int):
    """Int64 [1]: C = min(T, ceil(F * T * k / E)), in double as `MoESpec.lowering_capacity`."""
    slots = ceil_scaled(tokens, spec.lowering_capacity_factor, top_k, spec.num_experts)
    return op.Min(slots, tokens)


def lower_moe_capacity(spec: MoESpec, x, w: dict):
    """x [B, S, H] or [T, H] -> (out like x, chosen [..., E] bool: the pairs actually served)."""
    e_count, h = spec.num_experts, spec.hidden_size
    weights, chosen = lower_routing(spec, to_3d(x), w)
    weights = op.Reshape(weights, const_i([-1, e_count]))  # [T, E]
    chosen = op.Reshape(chosen, const_i([-1, e_count]))  # [T, E] float 0/1
    ids, top_k = pair_ids(spec, w, chosen)  # [T, k]
    x2 = op.Reshape(x, const_i([-1, h]))
    tokens = op.Shape(x2, start=0, end=1)  # [1]
    slots = _slots(spec, tokens, top_k)  # C, [1]
    position = op.Sub(op.CumSum(chosen, op.Constant(value_int=0)), const_f(1.0))  # [T, E]
    pair_position = op.GatherElements(position, ids, axis=1)  # [T, k]
    pair_chosen = op.Greater(op.GatherElements(chosen, ids, axis=1), const_f(0.5))
    keep = op.And(pair_chosen, op.Less(pair_position, op.Cast(slots, to=FLOAT)))
    total = op.Mul(slots, const_i([e_count]))  # E*C: the spare slot's index
    slot = op.Add(op.Mul(ids, slots), op.Cast(pair_position, to=INT64))
    slot = op.Where(keep, slot, total)  # [T, k]
    token_of_pair = op.Expand(
        op.Unsqueeze(
            op.Range(op.Constant(value_int=0), op.Squeeze(tokens), op.Constant(value_int=1)),
            const_i([1]),
        ),
        op.Shape(ids),
    )
    table = op.Expand(tokens, op.Add(total, const_i([1])))  # every slot -> the zero row
    table = op.ScatterElements(
        table, op.Reshape(slot, const_i([-1])), op.Reshape(token_of_pair, const_i([-1]))
    )
    table = op.Slice(table, const_i([0]), total)  # [E*C]
    zero_row = op.CastLike(op.ConstantOfShape(const_i([1, h])), x2)
    padded = op.Concat(x2, zero_row, axis=0)  # [T + 1, H]
    expert_in = op.Reshape(
        op.Gather(padded, table, axis=0), op.Concat(const_i([e_count, -1, h]), axis=0)
    )  # [E, C, H]
    pair_weight = op.Mul(
        op.CastLike(op.GatherElements(weights, ids, axis=1), x2), op.CastLike(keep, x2)
    )  # [T, k]
    if spec.gate_on_input:  # each slot's row times its pair's weight; combined with weight 1
        slot_gate = op.ScatterElements(
            op.CastLike(op.ConstantOfShape(op.Add(total, const_i([1]))), x2),
            op.Reshape(slot, const_i([-1])),
            op.Reshape(pair_weight, const_i([-1])),
        )
        slot_gate = op.Reshape(op.Slice(slot_gate, const_i([0]), total), const_i([e_count, -1, 1]))
        expert_in = op.Mul(expert_in, slot_gate)
        pair_weight = op.CastLike(keep, x2)
    up = batched_linear(w["w_up"], w.get("b_up"), expert_in)
    if spec.expert_kind == "gated":
        gate = batched_linear(w["w_gate"], w.get("b_gate"), expert_in)
        hidden = gated_activation(spec, gate, up)
    else:
        hidden = activation(spec.activation, up)
    expert_out = batched_linear(w["w_down"], w.get("b_down"), hidden)  # [E, C, H]
    norm_weight = w.get("post_norm_weight")
    if norm_weight is not None:
        norm_weight = op.Unsqueeze(norm_weight, const_i([1]))
    expert_out = op.Reshape(post_expert_norm(spec, expert_out, norm_weight), const_i([-1, h]))
    expert_out = op.Concat(expert_out, zero_row, axis=0)  # [E*C + 1, H]
    gathered = op.Gather(expert_out, slot, axis=0)  # [T, k, H]
    y = op.ReduceSum(
        op.Mul(gathered, op.Unsqueeze(pair_weight, const_i([-1]))), const_i([1]), keepdims=0
    )
    y = finish_moe_output(spec, y, x2, w)
    served = op.ScatterElements(
        op.ConstantOfShape(op.Shape(chosen)), ids, op.Cast(keep, to=FLOAT), axis=1
    )
    return op.Reshape(y, op.Shape(x)), reshape_chosen(served, x, e_count)
