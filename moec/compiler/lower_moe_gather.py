"""The ``gather`` lowering: each expert runs on its own tokens only. Standard ops only.

Per expert e: ``NonZero`` of its column of the routing mask gives its tokens, ``Gather`` picks
them, the FFN runs on [n_e, H] with expert e's own weight slices (folded into initializers by the
optimizer), and one ``ScatterND(reduction="add")`` adds every expert's weighted output back to its
tokens. Exact, no padding, FLOPs of the experts actually chosen; shapes are data-dependent.
"""

from __future__ import annotations

from moec.compiler.lower_routing import lower_routing
from moec.compiler.onnx_ops import (
    activation,
    add_shared_and_bias,
    const_i,
    gated_activation,
    op,
    reshape_chosen,
    to_3d,
)
from moec.ir import MoESpec

__all__ = ["expert_ffn_onnx", "lower_moe_gather"]


def expert_ffn_onnx(spec: MoESpec, w: dict, e: int, tokens):
    """Expert ``e`` on tokens [n, H] -> [n, H], with its slices of the stacked weights."""

    def pick(name: str):
        t = w.get(name)
        return None if t is None else op.Gather(t, op.Constant(value_int=e), axis=0)

    def project(weight, bias, x):  # weight [out, in]
        y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
        return y if bias is None else op.Add(y, bias)

    up = project(pick("w_up"), pick("b_up"), tokens)
    if spec.expert_kind == "gated":
        hidden = gated_activation(spec, project(pick("w_gate"), pick("b_gate"), tokens), up)
    else:
        hidden = activation(spec.activation, up)
    return project(pick("w_down"), pick("b_down"), hidden)


def lower_moe_gather(spec: MoESpec, x, w: dict):
    """x [B, S, H] or [T, H] -> (out like x, chosen [..., E] bool)."""
    e_count, h = spec.num_experts, spec.hidden_size
    weights, chosen = lower_routing(spec, to_3d(x), w)
    x2 = op.Reshape(x, const_i([-1, h]))
    combine = op.CastLike(op.Reshape(weights, const_i([-1, e_count])), x)  # [T, E]
    mask = op.Cast(op.Reshape(chosen, const_i([-1, e_count])), to=9)  # BOOL [T, E]
    rows, updates = [], []
    for e in range(e_count):
        column = op.Gather(mask, op.Constant(value_int=e), axis=1)  # [T]
        tokens = op.Reshape(op.NonZero(column), const_i([-1]))  # [n_e]
        y = expert_ffn_onnx(spec, w, e, op.Gather(x2, tokens, axis=0))
        gate = op.Gather(op.Gather(combine, op.Constant(value_int=e), axis=1), tokens, axis=0)
        rows.append(tokens)
        updates.append(op.Mul(y, op.Unsqueeze(gate, const_i([-1]))))
    indices = op.Unsqueeze(op.Concat(*rows, axis=0), const_i([-1]))  # [P, 1]
    zeros = op.CastLike(op.ConstantOfShape(op.Shape(x2)), x2)
    y = op.ScatterND(zeros, indices, op.Concat(*updates, axis=0), reduction="add")
    y = add_shared_and_bias(spec, y, x2, w)
    return op.Reshape(y, op.Shape(x)), reshape_chosen(chosen, x, e_count)
