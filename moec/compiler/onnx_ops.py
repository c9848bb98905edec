"""Building blocks for the ONNX lowerings: opsets, ORT contrib schemas, constants, activations.

The lowerings run inside torch.onnx's translation of a ``moec::moe`` node: they call onnxscript
ops on symbolic tensors and the exporter records the nodes. Weight rearrangements (transposes,
interleaving) are written as ops on initializers and folded away by the optimizer afterwards.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import onnx
import onnxscript
from onnxscript import opset18 as op

from moec.ir import MoESpec

__all__ = [
    "ORT_DOMAIN",
    "activation",
    "batched_linear",
    "ceil_scaled",
    "const_d",
    "const_f",
    "const_i",
    "finish_moe_output",
    "gated_activation",
    "linear",
    "msft",
    "ones_like",
    "op",
    "post_expert_norm",
    "register_ort_schemas",
    "reshape_chosen",
    "to_3d",
]

ORT_DOMAIN = "com.microsoft"
msft = onnxscript.values.Opset(ORT_DOMAIN, 1)
FLOAT = onnx.TensorProto.FLOAT
DOUBLE = onnx.TensorProto.DOUBLE
INT64 = onnx.TensorProto.INT64
BOOL = onnx.TensorProto.BOOL


def register_ort_schemas() -> None:
    """Make onnx (and so onnxscript and the checker) know ORT's MoE contrib ops (float and
    quantised).

    The schemas are read from the installed onnxruntime itself, so they match the kernels.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    wanted = {"MoE", "MoEGroupRouter", "QMoE"}
    for schema in ort_c.get_all_operator_schema():
        if schema.domain != ORT_DOMAIN or schema.name not in wanted:
            continue
        if onnx.defs.has(schema.name, schema.since_version, ORT_DOMAIN):
            continue
        onnx.defs.register_schema(_to_onnx_schema(schema))


def _to_onnx_schema(schema) -> onnx.defs.OpSchema:
    defs = onnx.defs.OpSchema

    def param(p) -> defs.FormalParameter:
        option = getattr(defs.FormalParameterOption, p.option.name)
        return defs.FormalParameter(p.name, p.typeStr, p.description, param_option=option)

    attributes = [
        defs.Attribute(
            name, getattr(defs.AttrType, a.type.name), a.description, required=a.required
        )
        for name, a in schema.attributes.items()
    ]
    constraints = [
        (t.type_param_str, list(t.allowed_type_strs), t.description)
        for t in schema.type_constraints
    ]
    return defs(
        schema.name,
        schema.domain,
        schema.since_version,
        doc=schema.doc,
        inputs=[param(p) for p in schema.inputs],
        outputs=[param(p) for p in schema.outputs],
        type_constraints=constraints,
        attributes=attributes,
    )


def const_f(value: float, like=None):
    """A float scalar constant, cast like ``like`` when given (else float32)."""
    c = op.Constant(value_float=float(value))
    return c if like is None else op.CastLike(c, like)


def const_d(value: float):
    """A float64 scalar constant (capacity arithmetic is done in double, as Python does)."""
    return op.Constant(value=onnx.numpy_helper.from_array(np.array(value, dtype=np.float64)))


CEIL_CHECKED = 1 << 20  # token counts over which an integer capacity is checked against Python's


def ceil_scaled(tokens, factor: float, times: int, over: int):
    """Int64 like ``tokens``: ``ceil(factor * tokens * times / over)`` as Python computes it in
    double. In integers (exact, and in the types TensorRT computes) when `_integer_ratio` finds
    a ratio that agrees with Python; else in double."""
    ratio = _integer_ratio(float(factor), times, over)
    if ratio is not None:
        scaled = op.Mul(tokens, const_i([ratio.numerator]))
        scaled = op.Add(scaled, const_i([ratio.denominator - 1]))
        return op.Div(scaled, const_i([ratio.denominator]))
    value = op.Mul(op.Mul(const_d(factor), op.Cast(tokens, to=DOUBLE)), const_d(times))
    return op.Cast(op.Ceil(op.Div(value, const_d(over))), to=INT64)


@functools.cache
def _integer_ratio(factor: float, times: int, over: int) -> Fraction | None:
    """``factor * times / over`` as a fraction of the factor's decimal form, if its integer
    ceiling gives Python's double one at every token count below `CEIL_CHECKED`."""
    ratio = Fraction(repr(factor)) * times / over
    if ratio.numerator >= 1 << 40:
        return None
    counts = np.arange(CEIL_CHECKED, dtype=np.int64)
    python = np.ceil(factor * counts.astype(np.float64) * times / over)
    integer = (ratio.numerator * counts + ratio.denominator - 1) // ratio.denominator
    return ratio if np.array_equal(python, integer) else None


def const_i(values: list[int]):
    """A 1-D int64 constant."""
    return op.Constant(value_ints=list(values))


def ones_like(x):
    """Float32 ones of x's shape."""
    return op.ConstantOfShape(
        op.Shape(x), value=onnx.numpy_helper.from_array(np.ones(1, np.float32))
    )


def to_3d(x):
    """[B, S, H] stays; [T, H] (one sequence) becomes [1, T, H]."""
    return x if len(x.shape) == 3 else op.Unsqueeze(x, const_i([0]))


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` for a [out, in] weight."""
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def batched_linear(stacked, bias, x):
    """x [E, n, in] @ stacked[e].T [E, in, out] (+ bias [E, out]) -> [E, n, out]."""
    y = op.MatMul(x, op.Transpose(stacked, perm=[0, 2, 1]))
    return y if bias is None else op.Add(y, op.Unsqueeze(bias, const_i([1])))


def activation(name: str, x):
    if name == "silu":
        return op.Mul(x, op.Sigmoid(x))
    if name == "relu":
        return op.Relu(x)
    if name == "relu2":
        return op.Mul(op.Relu(x), op.Relu(x))
    if name == "gelu":
        erf = op.Erf(op.Mul(x, const_f(1 / math.sqrt(2), x)))
        return op.Mul(op.Mul(x, const_f(0.5, x)), op.Add(erf, const_f(1.0, x)))
    if name == "gelu_tanh":
        cube = op.Mul(op.Mul(x, x), x)
        inner = op.Mul(
            op.Add(x, op.Mul(cube, const_f(0.044715, x))), const_f(math.sqrt(2 / math.pi), x)
        )
        return op.Mul(op.Mul(x, const_f(0.5, x)), op.Add(op.Tanh(inner), const_f(1.0, x)))
    raise ValueError(f"unknown activation {name!r}")


def gated_activation(spec: MoESpec, gate, up):
    """The gated hidden state ``act(gate) * up`` (clamped by ``activation_limit``), or the
    parameterised ``swiglu`` or ``swiglu_softcap``."""
    if spec.activation == "swiglu_softcap":
        capped_gate = _softcap(gate, spec.gate_softcap)
        return op.Mul(op.Mul(capped_gate, op.Sigmoid(gate)), _softcap(up, spec.up_softcap))
    if spec.activation != "swiglu":
        limit = spec.activation_limit
        if limit is None:
            return op.Mul(activation(spec.activation, gate), up)
        capped = op.Min(activation(spec.activation, gate), const_f(limit, gate))
        return op.Mul(capped, op.Max(op.Min(up, const_f(limit, up)), const_f(-limit, up)))
    limit = spec.swiglu_limit
    if limit is not None:
        gate = op.Min(gate, const_f(limit, gate))
        up = op.Max(op.Min(up, const_f(limit, up)), const_f(-limit, up))
    glu = op.Mul(gate, op.Sigmoid(op.Mul(gate, const_f(spec.swiglu_alpha, gate))))
    return op.Mul(glu, op.Add(up, const_f(spec.swiglu_beta, up)))


def post_expert_norm(spec: MoESpec, y, weight=None):
    """Experts' outputs ``y`` [..., H] RMS-normalised in float32 and scaled by ``weight``
    (broadcast to y) where the block has a post-expert norm; ``y`` otherwise."""
    if spec.post_expert_norm_eps is None:
        return y
    y32 = op.Cast(y, to=FLOAT)
    mean_square = op.ReduceMean(op.Mul(y32, y32), const_i([-1]), keepdims=1)
    # eps as a [1] tensor: onnxscript's optimizer drops ``x + c`` for a scalar |c| <= 1e-8
    # (docs/upstream/onnxscript-add-tiny-constant.md)
    eps = op.Constant(value_floats=[spec.post_expert_norm_eps])
    normed = op.Div(y32, op.Sqrt(op.Add(mean_square, eps)))
    if weight is not None:
        normed = op.Mul(normed, op.Cast(weight, to=FLOAT))
    return op.CastLike(normed, y)


def _softcap(x, cap: float):
    """``cap * tanh(x / cap)``."""
    return op.Mul(op.Tanh(op.Div(x, const_f(cap, x))), const_f(cap, x))


def finish_moe_output(spec: MoESpec, y, x2, w: dict):
    """y [T, H] plus the shared expert on tokens x2 [T, H] and the output bias, where present,
    and NaN for every token whose input is not finite, as the eager block gives (routing may
    hand such a token no expert at all)."""
    if spec.shared_expert_size:
        y = op.Add(y, _shared_expert(spec, x2, w))
    if w.get("output_bias") is not None:
        y = op.Add(y, w["output_bias"])
    nonfinite = op.ReduceSum(op.Mul(x2, const_f(0.0, x2)), const_i([-1]), keepdims=1)
    return op.Add(y, nonfinite)  # 0 for a finite token, NaN for any other


def _shared_expert(spec: MoESpec, x2, w: dict):
    hidden = op.Mul(
        activation(spec.shared_activation, linear(x2, w["shared_gate"])),
        linear(x2, w["shared_up"]),
    )
    y = linear(hidden, w["shared_down"])
    if spec.shared_expert_gated:
        y = op.Mul(y, op.Sigmoid(linear(x2, w["shared_expert_gate"])))
    return y


def reshape_chosen(chosen, x, num_experts: int):
    """Routing mask, float 0/1 of any shape with E last -> bool [*x.shape[:-1], E]."""
    shape = op.Concat(op.Shape(x, end=-1), const_i([num_experts]), axis=0)
    return op.Cast(op.Reshape(chosen, shape), to=BOOL)
