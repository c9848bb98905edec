"""The ``fused`` lowering for the ``ort`` target: ONNX Runtime's ``com.microsoft.MoE``.

The expert compute always runs in the fused op; the routing takes one of three routes:

- native: softmax routing without groups, bias or capacity feeds the router logits straight in
  (ORT does softmax -> top-k -> optional renormalisation; top-k-then-softmax is the renormalised
  case);
- ``MoEGroupRouter``: sigmoid routing with optional groups and correction bias (DeepSeek-V3)
  uses ORT's fused router, which writes ``log(score)`` at the chosen experts;
- anything else (capacity, group max over softmax, ...) is routed in standard ops
  (`lower_routing`) and handed over as ``log(weight)`` at the chosen experts and -1e30
  elsewhere: MoE's softmax then gives ``weight / sum(weights)``, and multiplying the output by
  ``sum(weights)`` restores the exact weights (a token whose pairs all overflowed gets 0).

A quantised block runs in ``com.microsoft.QMoE`` on its packed codes (`moec.compiler.lower_qmoe`)
when QMoE computes it exactly, else in ``MoE`` on its dequantised weights, with a warning why.

Facts about onnxruntime 1.32 CPU this relies on: gated experts need ``swiglu_fusion=1``
(interleaved gate/up rows), its ``gelu`` is the tanh approximation, and ``use_sparse_mixer`` is
ignored. Shared experts stay outside the op.
"""

from __future__ import annotations

import logging

from moec.compiler.lower_qmoe import qmoe_attributes, qmoe_matrix, qmoe_unsupported_reasons
from moec.compiler.lower_quantized import dequantized_weights
from moec.compiler.lower_routing import lower_router_logits, lower_routing, scatter_chosen
from moec.compiler.onnx_ops import (
    FLOAT,
    const_f,
    const_i,
    finish_moe_output,
    msft,
    ones_like,
    op,
    reshape_chosen,
    to_3d,
)
from moec.ir import MoESpec

__all__ = ["lower_moe_fused", "unsupported_reasons"]

log = logging.getLogger(__name__)

SENTINEL = -1e30  # router_probs of experts that must not be picked
ORT_PLAIN_ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu_tanh": "gelu"}


def unsupported_reasons(spec: MoESpec) -> list[str]:
    """Why ``com.microsoft.MoE`` cannot compute this block exactly (empty: it can)."""
    reasons = []
    if spec.routing == "expert_choice":
        reasons.append(
            "expert-choice routing gives each token a variable number of experts; "
            "com.microsoft.MoE picks a fixed top-k per token"
        )
    if spec.signed_weights:
        reasons.append(
            "the block's own gate may give negative weights; com.microsoft.MoE's weights come "
            "from a softmax"
        )
    if spec.expert_kind == "gated" and spec.activation not in ("silu", "swiglu"):
        why = ", without softcaps" if spec.activation == "swiglu_softcap" else ""
        reasons.append(
            f"com.microsoft.MoE on CPU has no gated {spec.activation} (only SwiGLU{why})"
        )
    if spec.activation_limit is not None:
        reasons.append(
            "com.microsoft.MoE clamps SwiGLU's inputs (swiglu_limit), not the activation's "
            "output (activation_limit)"
        )
    if spec.gate_on_input:
        reasons.append(
            "com.microsoft.MoE scales each expert's output by its routing weight; this block "
            "scales the expert's input (gate_on_input)"
        )
    if spec.post_expert_norm_eps is not None:
        reasons.append("com.microsoft.MoE cannot normalise each expert's output (post-expert norm)")
    if spec.expert_kind == "plain" and spec.activation not in ORT_PLAIN_ACTIVATIONS:
        why = " (its gelu is the tanh approximation)" if spec.activation == "gelu" else ""
        reasons.append(f"com.microsoft.MoE on CPU has no plain {spec.activation}{why}")
    return reasons


def _native_routing(spec: MoESpec) -> bool:
    return (
        spec.expert_map is None
        # QMoE renormalises its top-k weights whatever normalize_routing_weights says
        and (spec.weight_bits is None or spec.norm_topk_prob or spec.topk_before_softmax)
        and spec.score == "softmax"
        and spec.n_group == 1
        and not spec.has_capacity
        and spec.routing == "topk"
    )


def _group_router(spec: MoESpec) -> bool:
    return (
        spec.expert_map is None
        and spec.score == "sigmoid"
        and not spec.has_capacity
        and spec.routing == "topk"
    )


def lower_moe_fused(spec: MoESpec, x, w: dict):
    """x [B, S, H] or [T, H] -> (out like x, chosen [..., E] bool)."""
    quantized = spec.weight_bits is not None
    if quantized and (reasons := qmoe_unsupported_reasons(spec)):
        log.warning(
            "a %s block runs com.microsoft.MoE on dequantised weights, not QMoE: %s",
            spec.summary(),
            "; ".join(reasons),
        )
        spec, w = dequantized_weights(spec, w)
        quantized = False
    h, e = spec.hidden_size, spec.num_experts
    x2 = op.Reshape(x, const_i([-1, h]))
    post_scale = None
    if _native_routing(spec) and w.get("selection_bias") is None:
        probs = lower_router_logits(x2, w)
        _, idx = op.TopK(probs, const_i([spec.top_k]), axis=-1)
        chosen = scatter_chosen(probs, idx, ones_like(idx))
        normalize = spec.norm_topk_prob or spec.topk_before_softmax
        if spec.routed_scaling_factor != 1.0:
            post_scale = const_f(spec.routed_scaling_factor)
    elif _group_router(spec):
        bias = w.get("selection_bias")
        bias = op.ConstantOfShape(const_i([e])) if bias is None else op.Cast(bias, to=FLOAT)
        probs, *_unused = msft.MoEGroupRouter(
            lower_router_logits(x2, w),
            bias,
            n_group=spec.n_group,
            topk_group=spec.topk_group,
            group_topk=1 if spec.group_score == "max" else 2,
            top_k=spec.top_k,
            router_sentinel=SENTINEL,
        )  # the other two outputs are dropped after export (see lower_onnx)
        chosen = op.Cast(op.Greater(probs, const_f(SENTINEL / 2)), to=FLOAT)
        normalize = True
        post_scale = const_f(spec.routed_scaling_factor)
        if not spec.norm_topk_prob:  # MoE renormalises; put the sum of chosen scores back
            post_scale = op.Mul(op.ReduceSum(op.Exp(probs), const_i([-1]), keepdims=1), post_scale)
        elif spec.routed_scaling_factor == 1.0:
            post_scale = None
    else:
        weights, chosen = lower_routing(spec, to_3d(x), w)
        weights = op.Reshape(weights, const_i([-1, e]))
        chosen = op.Reshape(chosen, const_i([-1, e]))
        logs = op.Log(op.Max(weights, const_f(1e-30)))
        probs = op.Where(op.Greater(chosen, const_f(0.5)), logs, const_f(SENTINEL))
        normalize = True
        post_scale = op.ReduceSum(weights, const_i([-1]), keepdims=1)

    top_k = spec.top_k
    if spec.routing == "external":  # the family's router decides k; its output shape says it
        top_k = int(w["routed_ids"].shape[-1])
    top_k = min(top_k, e)  # merged experts: a token has at most E stored experts
    fc1, fc1_bias, attrs = _first_projection(spec, w, x2)
    attrs.update(k=top_k, normalize_routing_weights=int(normalize))
    probs = op.CastLike(probs, x2)
    if quantized:
        y = _qmoe(spec, x2, probs, w, fc1_bias, attrs)
    else:
        y = msft.MoE(x2, probs, fc1, fc1_bias, w["w_down"], w.get("b_down"), **attrs)
    if post_scale is not None:
        y = op.Mul(y, op.CastLike(post_scale, y))
    y = finish_moe_output(spec, y, x2, w)
    return op.Reshape(y, op.Shape(x)), reshape_chosen(chosen, x, e)


def _qmoe(spec: MoESpec, x2, probs, w: dict, fc1_bias, attrs: dict):
    """``QMoE`` on the block's packed codes; FC1 interleaves gate/up codes, scales and zero
    points row by row as `_first_projection` does the float weights."""

    def stored(name: str) -> list:
        return [w[name], w[f"{name}_scale"], w.get(f"{name}_zero")]

    if spec.expert_kind == "plain":
        fc1 = stored("w_up")
    else:
        gate, up = stored("w_gate"), stored("w_up")
        fc1 = [g if g is None else _interleave(g, u, spec) for g, u in zip(gate, up, strict=True)]
    fc1_w, fc1_scale, fc1_zero = qmoe_matrix(spec, *fc1, like=x2)
    fc2_w, fc2_scale, fc2_zero = qmoe_matrix(spec, *stored("w_down"), like=x2)
    return msft.QMoE(
        x2,
        probs,
        fc1_w,
        fc1_scale,
        fc1_bias,
        fc2_w,
        fc2_scale,
        w.get("b_down"),
        None,  # fc3 weights, scales and bias: FC1 holds the gate (swiglu_fusion)
        None,
        None,
        fc1_zero,
        fc2_zero,
        **attrs,
        **qmoe_attributes(spec),
    )


def _first_projection(spec: MoESpec, w: dict, like):
    """FC1 weights [E, (2)I, H] (float; None for a quantised block), its bias cast like
    ``like``, and the activation attributes."""
    if spec.expert_kind == "plain":
        b_up = w.get("b_up")
        b_up = None if b_up is None else op.CastLike(b_up, like)
        fc1 = None if spec.weight_bits is not None else w["w_up"]
        return fc1, b_up, {"activation_type": ORT_PLAIN_ACTIVATIONS[spec.activation]}
    fc1 = None if spec.weight_bits is not None else _interleave(w["w_gate"], w["w_up"], spec)
    b_gate, b_up = w.get("b_gate"), w.get("b_up")
    fc1_bias = None
    if b_gate is not None or b_up is not None:
        zeros = op.ConstantOfShape(const_i([spec.num_experts, spec.expert_size]))
        b_gate = zeros if b_gate is None else b_gate
        b_up = zeros if b_up is None else b_up
        fc1_bias = _interleave(op.CastLike(b_gate, like), op.CastLike(b_up, like), spec)
    attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0}
    if spec.activation == "swiglu":
        attrs.update(activation_alpha=spec.swiglu_alpha, activation_beta=spec.swiglu_beta)
        if spec.swiglu_limit is not None:
            attrs["swiglu_limit"] = spec.swiglu_limit
    else:
        attrs["activation_beta"] = 0.0
    return fc1, fc1_bias, attrs


def _interleave(gate, up, spec: MoESpec):
    """Rows gate0, up0, gate1, up1, ...: [E, I, ...] x2 -> [E, 2I, ...] (a bias [E, I], a
    matrix [E, I, H], its scales or zero points [E, I, H/block])."""
    pair = op.Concat(op.Unsqueeze(gate, const_i([2])), op.Unsqueeze(up, const_i([2])), axis=2)
    rows = const_i([spec.num_experts, 2 * spec.expert_size])
    return op.Reshape(pair, op.Concat(rows, op.Shape(gate, start=2), axis=0))
