"""The ``dense`` lowering: every expert on every token, then a weighted combine. Standard ops only.

Exact (same math as the eager kernel) and static in shape, at E/k times the expert FLOPs. All
experts' projections run as one MatMul: the stacked weights [E, I, H] become [H, E*I], and the
routing weights are applied to the hidden state before the down projection, so the weighted sum
over experts is itself one MatMul with [E*I, H] (not with a post-expert norm: its experts' outputs
are normalised one by one before the weighted sum). A ``gate_on_input`` block gives each expert
its own scaled rows instead: batched MatMuls over [E, T, H], outputs summed where chosen.
"""

from __future__ import annotations

from moec.compiler.lower_routing import lower_routing
from moec.compiler.onnx_ops import (
    activation,
    batched_linear,
    const_i,
    finish_moe_output,
    gated_activation,
    op,
    post_expert_norm,
    reshape_chosen,
    to_3d,
)
from moec.ir import MoESpec

__all__ = ["lower_moe_dense"]


def lower_moe_dense(spec: MoESpec, x, w: dict):
    """x [B, S, H] or [T, H] -> (out like x, chosen [..., E] bool)."""
    e, i, h = spec.num_experts, spec.expert_size, spec.hidden_size
    weights, chosen = lower_routing(spec, to_3d(x), w)
    x2 = op.Reshape(x, const_i([-1, h]))
    combine = op.CastLike(op.Reshape(weights, const_i([-1, e])), x)  # [T, E]
    if spec.gate_on_input:
        y = _gated_inputs(
            spec, w, x2, combine, op.CastLike(op.Reshape(chosen, const_i([-1, e])), x)
        )
        y = finish_moe_output(spec, y, x2, w)
        return op.Reshape(y, op.Shape(x)), reshape_chosen(chosen, x, e)

    def project(stacked, bias):  # [E, I, H] (+ [E, I]) -> [T, E*I]
        y = op.MatMul(x2, op.Reshape(op.Transpose(stacked, perm=[2, 0, 1]), const_i([h, e * i])))
        return y if bias is None else op.Add(y, op.Reshape(bias, const_i([e * i])))

    up = project(w["w_up"], w.get("b_up"))
    if spec.expert_kind == "gated":
        hidden = gated_activation(spec, project(w["w_gate"], w.get("b_gate")), up)
    else:
        hidden = activation(spec.activation, up)
    if spec.post_expert_norm_eps is None:
        y = _weighted_down(spec, w, hidden, combine)
    else:
        y = _normed_down(spec, w, hidden, combine)
    y = finish_moe_output(spec, y, x2, w)
    return op.Reshape(y, op.Shape(x)), reshape_chosen(chosen, x, e)


def _weighted_down(spec: MoESpec, w: dict, hidden, combine):
    """hidden [T, E*I] weighted by combine [T, E], then every expert's down projection and the
    sum over experts as one MatMul with [E*I, H] -> [T, H]."""
    e, i, h = spec.num_experts, spec.expert_size, spec.hidden_size
    weighted = op.Mul(op.Reshape(hidden, const_i([-1, e, i])), op.Unsqueeze(combine, const_i([-1])))
    down = op.Reshape(op.Transpose(w["w_down"], perm=[0, 2, 1]), const_i([e * i, h]))
    y = op.MatMul(op.Reshape(weighted, const_i([-1, e * i])), down)
    if w.get("b_down") is not None:
        y = op.Add(y, op.MatMul(combine, w["b_down"]))
    return y


def _normed_down(spec: MoESpec, w: dict, hidden, combine):
    """With a post-expert norm the weights cannot go before the down projection: every
    expert's output [E, T, H] is normalised, then weighted by combine [T, E] and summed."""
    e, i = spec.num_experts, spec.expert_size
    per_expert = op.Transpose(op.Reshape(hidden, const_i([-1, e, i])), perm=[1, 0, 2])  # [E, T, I]
    out = op.MatMul(per_expert, op.Transpose(w["w_down"], perm=[0, 2, 1]))  # [E, T, H]
    if w.get("b_down") is not None:
        out = op.Add(out, op.Unsqueeze(w["b_down"], const_i([1])))
    norm_weight = w.get("post_norm_weight")
    if norm_weight is not None:
        norm_weight = op.Unsqueeze(norm_weight, const_i([1]))
    out = post_expert_norm(spec, out, norm_weight)
    gates = op.Unsqueeze(op.Transpose(combine, perm=[1, 0]), const_i([-1]))  # [E, T, 1]
    return op.ReduceSum(op.Mul(out, gates), const_i([0]), keepdims=0)


def _gated_inputs(spec: MoESpec, w: dict, x2, combine, chosen2):
    """Every expert on every token's row times its weight: [T, H] -> [T, H], the outputs summed
    over the chosen experts (an unchosen expert's input is zero, but its biases are not)."""
    per_expert = op.Unsqueeze(op.Transpose(combine, perm=[1, 0]), const_i([-1]))  # [E, T, 1]
    rows = op.Mul(op.Unsqueeze(x2, const_i([0])), per_expert)  # [E, T, H]
    up = batched_linear(w["w_up"], w.get("b_up"), rows)
    if spec.expert_kind == "gated":
        hidden = gated_activation(spec, batched_linear(w["w_gate"], w.get("b_gate"), rows), up)
    else:
        hidden = activation(spec.activation, up)
    out = batched_linear(w["w_down"], w.get("b_down"), hidden)  # [E, T, H]
    mask = op.Unsqueeze(op.Transpose(chosen2, perm=[1, 0]), const_i([-1]))
    return op.ReduceSum(op.Mul(out, mask), const_i([0]), keepdims=0)
