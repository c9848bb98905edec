"""The experts kernels of the ``moec::moe`` op in PyTorch: each expert on its own tokens.

`grouped_experts` (the ``kernel`` lowering, and the op's reference) runs one matmul chain per
expert segment; `grouped_mm_experts` (the ``grouped_mm`` lowering) one ``torch._grouped_mm`` per
projection over every segment, on the stored weights. Both take rows grouped by expert and
return the experts' outputs in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import MoEWeights
from moec.ir.quantized_experts import expert_matrix

__all__ = [
    "GROUPED_MM_ALIGN",
    "ONEDNN",
    "PLAIN_ACTIVATION_FUNCTIONS",
    "expert_ffn",
    "expert_hidden",
    "expert_segments",
    "gated_activation",
    "grouped_experts",
    "grouped_mm_experts",
    "grouped_mm_unsupported_reasons",
    "linear",
    "onednn_linear",
    "post_expert_norm",
    "shared_ffn",
]


PLAIN_ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    return PLAIN_ACTIVATION_FUNCTIONS[name](x)


ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x [n, in] @ weight [out, in].T (+ bias [out]): oneDNN's GEMM on the dense weight for
    float32 on the CPU without autograd (faster than MKL on most hosts measured; see
    docs/performance.md), ``F.linear`` otherwise."""
    if (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x [n, in] @ weight.T (+ bias) with oneDNN's GEMM; ``weight`` dense [out, in] or packed
    by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


# the dtypes torch._grouped_mm multiplies; its strides must be multiples of 16 bytes
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPED_MM_ALIGN = 8  # elements: hidden and expert sizes divisible by this suit every dtype


def _at(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


def gated_activation(spec: MoESpec, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated experts' activation of ``spec`` on gate and up projections of one shape."""
    if spec.activation == "swiglu":
        if spec.swiglu_limit is not None:
            gate = gate.clamp(max=spec.swiglu_limit)
            up = up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
        return gate * torch.sigmoid(spec.swiglu_alpha * gate) * (up + spec.swiglu_beta)
    if spec.activation == "swiglu_softcap":
        capped_gate = torch.tanh(gate / spec.gate_softcap) * spec.gate_softcap
        return (
            capped_gate * torch.sigmoid(gate) * torch.tanh(up / spec.up_softcap) * spec.up_softcap
        )
    if spec.activation_limit is not None:
        limit = spec.activation_limit
        return _act(spec.activation, gate).clamp(max=limit) * up.clamp(-limit, limit)
    return _act(spec.activation, gate) * up


def expert_hidden(
    spec: MoESpec, w: MoEWeights, e: int, rows: torch.Tensor, project=F.linear
) -> torch.Tensor:
    """Expert ``e``'s activations before its down projection: [n, H] -> [n, I], with
    ``project(x, weight [out, in], bias [out] | None)`` (a quantised block's matrices of
    expert ``e`` alone dequantised)."""
    up = project(rows, expert_matrix(spec, w, "w_up", e), _at(w.b_up, e))
    if spec.expert_kind == "plain":
        return _act(spec.activation, up)
    gate = project(rows, expert_matrix(spec, w, "w_gate", e), _at(w.b_gate, e))
    return gated_activation(spec, gate, up)


def expert_ffn(spec: MoESpec, w: MoEWeights, e: int, rows: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on its tokens ``rows`` [n, H] -> [n, H]."""
    down = expert_matrix(spec, w, "w_down", e)
    out = linear(expert_hidden(spec, w, e, rows, linear), down, _at(w.b_down, e))
    return post_expert_norm(spec, out, _at(w.post_norm_weight, e))


def post_expert_norm(spec: MoESpec, out: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The experts' outputs ``out`` [n, H] RMS-normalised in float32 and scaled by ``weight``
    ([H], or [n, H] per row) where the block has a post-expert norm; ``out`` otherwise."""
    if spec.post_expert_norm_eps is None:
        return out
    y = out.float()
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + spec.post_expert_norm_eps)
    return (y if weight is None else y * weight.float()).to(out.dtype)


def grouped_experts(spec: MoESpec, w: MoEWeights, rows: torch.Tensor, counts: list[int]):
    """Each expert on its rows: ``rows`` [P, H] grouped by expert, ``counts[e]`` of them for
    expert e -> [P, H] in the same order. A quantised block's chosen experts are dequantised
    one by one, for this call."""
    return torch.cat([expert_ffn(spec, w, e, part) for e, part in expert_segments(rows, counts)])


def grouped_mm_experts(spec: MoESpec, w: MoEWeights, rows: torch.Tensor, counts: list[int]):
    """`grouped_experts` with one ``torch._grouped_mm`` per projection over every expert's rows
    (the stacked weights read in place, as transformers' ``grouped_mm`` does), for float32,
    bfloat16 and float16 rows (``torch._grouped_mm``'s dtypes; others take the per-expert loop).
    """
    if rows.dtype not in GROUPED_MM_DTYPES:
        return grouped_experts(spec, w, rows, counts)
    sizes = torch.tensor(counts)
    offs = sizes.cumsum(0, dtype=torch.int32)  # where each expert's rows end

    def project(x, weight, bias):  # x [P, in] @ weight[e] [out, in].T per segment (+ bias[e])
        out = torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)
        return out if bias is None else out + bias.repeat_interleave(sizes, dim=0)

    up = project(rows, w.w_up, w.b_up)
    if spec.expert_kind == "plain":
        hidden = _act(spec.activation, up)
    else:
        hidden = gated_activation(spec, project(rows, w.w_gate, w.b_gate), up)
    weight = None if w.post_norm_weight is None else w.post_norm_weight.repeat_interleave(sizes, 0)
    return post_expert_norm(spec, project(hidden, w.w_down, w.b_down), weight)


def expert_segments(rows: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(e, expert e's rows) for each expert with rows, from ``rows`` grouped by expert."""
    active = [e for e, n in enumerate(counts) if n]  # most experts are idle at a few tokens
    return list(zip(active, rows.split([counts[e] for e in active]), strict=True))


def shared_ffn(spec: MoESpec, w: MoEWeights, x: torch.Tensor, project=linear) -> torch.Tensor:
    """The shared expert on every token: [n, H] -> [n, H] (zero when the block has none), with
    ``project(x, weight [out, in])`` (default: `linear`, which is not exportable)."""
    if not spec.shared_expert_size:
        return torch.zeros_like(x)
    hidden = _act(spec.shared_activation, project(x, w.shared_gate)) * project(x, w.shared_up)
    out = project(hidden, w.shared_down)
    if spec.shared_expert_gated:
        out = out * torch.sigmoid(F.linear(x, w.shared_expert_gate))
    return out


def grouped_mm_unsupported_reasons(spec: MoESpec) -> list[str]:
    """Why `grouped_mm_experts` cannot run this block (empty: it can)."""
    sizes = {"hidden": spec.hidden_size, "expert": spec.expert_size}
    return [
        f"torch._grouped_mm needs sizes divisible by {GROUPED_MM_ALIGN}: {name} size is {n}"
        for name, n in sizes.items()
        if n % GROUPED_MM_ALIGN
    ]
