"""`MoEWeights`: the tensors of one MoE block, stacked with the expert index first, in the order
the ``moec::moe`` op takes them (`WEIGHT_NAMES`), with the shapes a `MoESpec` implies. Quantised
experts (``spec.weight_bits``) hold uint8 codes in ``w_gate``/``w_up``/``w_down`` and their
scales (and asymmetric zero points) in `QUANT_WEIGHTS`."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from moec.errors import SpecError
from moec.ir.moe_spec import MoESpec

__all__ = ["EXPERT_WEIGHTS", "QUANTIZED", "QUANT_WEIGHTS", "WEIGHT_NAMES", "MoEWeights"]

# stacked per expert
QUANTIZED = ("w_gate", "w_up", "w_down")  # the matrices a quantised block stores as codes
QUANT_WEIGHTS = tuple(f"{n}_{part}" for part in ("scale", "zero") for n in QUANTIZED)
EXPERT_WEIGHTS = (
    "w_gate",
    "w_up",
    "w_down",
    "b_gate",
    "b_up",
    "b_down",
    "post_norm_weight",
    *QUANT_WEIGHTS,
)


@dataclass
class MoEWeights:
    """The tensors of one MoE block, stacked with the expert index first (see module doc)."""

    router_weight: torch.Tensor | None
    w_up: torch.Tensor | None
    w_down: torch.Tensor | None
    router_bias: torch.Tensor | None = None
    selection_bias: torch.Tensor | None = None
    w_gate: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None
    shared_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None
    shared_expert_gate: torch.Tensor | None = None
    output_bias: torch.Tensor | None = None
    post_norm_weight: torch.Tensor | None = None
    w_gate_scale: torch.Tensor | None = None
    w_up_scale: torch.Tensor | None = None
    w_down_scale: torch.Tensor | None = None
    w_gate_zero: torch.Tensor | None = None
    w_up_zero: torch.Tensor | None = None
    w_down_zero: torch.Tensor | None = None

    def args(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(getattr(self, name) for name in WEIGHT_NAMES)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t) for n in WEIGHT_NAMES if (t := getattr(self, n)) is not None]

    @staticmethod
    def expected_shapes(spec: MoESpec) -> dict[str, tuple[int, ...] | None]:
        """The shape ``spec`` implies for each tensor (None: the block has no use for it)."""
        e, h, i, s = spec.num_experts, spec.hidden_size, spec.expert_size, spec.shared_expert_size
        r = spec.router_experts
        routed = spec.routing != "external"
        ffn = spec.expert_kind != "module"
        gated = spec.expert_kind == "gated"
        shapes = {
            "router_weight": (r, h) if routed else None,
            "router_bias": (r,) if routed else None,
            "selection_bias": (r,) if routed else None,
            "w_gate": (e, i, h) if gated else None,
            "w_up": (e, i, h) if ffn else None,
            "w_down": (e, h, i) if ffn else None,
            "b_gate": (e, i) if gated else None,
            "b_up": (e, i) if ffn else None,
            "b_down": (e, h) if ffn else None,
            "shared_gate": (s, h) if s else None,
            "shared_up": (s, h) if s else None,
            "shared_down": (h, s) if s else None,
            "shared_expert_gate": (1, h) if spec.shared_expert_gated else None,
            "output_bias": (h,),
            "post_norm_weight": (e, h) if spec.post_expert_norm_eps is not None else None,
        }
        for name in QUANT_WEIGHTS:
            matrix = shapes[name.rsplit("_", 1)[0]]
            wanted = spec.weight_bits is not None and matrix is not None
            if name.endswith("_zero"):
                wanted = wanted and not spec.weight_symmetric
            blocks = 1 if matrix is None else matrix[2] // (spec.weight_block_size or matrix[2])
            shapes[name] = (*matrix[:2], blocks) if wanted else None
        return shapes

    @staticmethod
    def required(spec: MoESpec) -> set[str]:
        """The tensors ``spec`` cannot do without."""
        required = {"router_weight"} if spec.routing != "external" else set()
        if spec.expert_kind != "module":
            required |= {"w_up", "w_down"}
        if spec.expert_kind == "gated":
            required.add("w_gate")
        if spec.shared_expert_size:
            required |= {"shared_gate", "shared_up", "shared_down"}
        if spec.shared_expert_gated:
            required.add("shared_expert_gate")
        if spec.weight_bits is not None:
            quantized = {n for n in QUANTIZED if n in required}
            required |= {f"{n}_scale" for n in quantized}
            if not spec.weight_symmetric:
                required |= {f"{n}_zero" for n in quantized}
        return required

    def check(self, spec: MoESpec) -> None:
        """Raise SpecError unless every tensor has the shape ``spec`` implies."""
        expected, required = self.expected_shapes(spec), self.required(spec)
        for name in WEIGHT_NAMES:
            tensor, shape = getattr(self, name), expected[name]
            if tensor is None:
                if name in required:
                    raise SpecError(f"MoE weights: {name} is required by {spec.summary()}")
                continue
            if shape is None:
                raise SpecError(
                    f"MoE weights: {name} given, but {spec.summary()} has no use for it"
                )
            if tuple(tensor.shape) != shape:
                raise SpecError(
                    f"MoE weights: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"for {spec.summary()} (hidden {spec.hidden_size})"
                )
            codes = spec.weight_bits is not None and (name in QUANTIZED or name.endswith("_zero"))
            if codes and tensor.dtype != torch.uint8:
                raise SpecError(f"MoE weights: {name} of a quantised block must be uint8 codes")


WEIGHT_NAMES: tuple[str, ...] = (
    "router_weight",
    "router_bias",
    "selection_bias",
    "w_gate",
    "w_up",
    "w_down",
    "b_gate",
    "b_up",
    "b_down",
    "shared_gate",
    "shared_up",
    "shared_down",
    "shared_expert_gate",
    "output_bias",
    "post_norm_weight",
    *QUANT_WEIGHTS,
)
assert set(WEIGHT_NAMES) == {f.name for f in fields(MoEWeights)}
