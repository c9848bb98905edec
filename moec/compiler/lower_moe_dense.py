"""The ``dense`` lowering: every expert on every token, then a weighted combine. Standard ops only.

Exact (same math as the eager kernel) and static in shape, at E/k times the expert FLOPs. All
experts' projections run as one MatMul: the stacked weights [E, I, H] become [H, E*I], and the
routing weights are applied to the hidden state before the down projection, so the weighted sum
over experts is itself one MatMul with [E*I, H]. A ``gate_on_input`` block gives each expert
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
    weighted = op.Mul(op.Reshape(hidden, const_i([-1, e, i])), op.Unsqueeze(combine, const_i([-1])))
    down = op.Reshape(op.Transpose(w["w_down"], perm=[0, 2, 1]), const_i([e * i, h]))
    y = op.MatMul(op.Reshape(weighted, const_i([-1, e * i])), down)
    if w.get("b_down") is not None:
        y = op.Add(y, op.MatMul(combine, w["b_down"]))
    y = finish_moe_output(spec, y, x2, w)
    return op.Reshape(y, op.Shape(x)), reshape_chosen(chosen, x, e)


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
