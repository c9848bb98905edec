"""moec's reference MoE layers, written plainly in PyTorch as their families describe them.

Each layer maps [B, S, H] -> [B, S, H], computes its routing in float32 in its own code (an
independent check on the IR's routing), runs experts with a loop over experts, and converts
itself to the IR with ``to_moe() -> (MoESpec, MoEWeights)``, the protocol capture looks for.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from moec.ir import MoESpec, MoEWeights
from moec.ir.expert_kernels import PLAIN_ACTIVATION_FUNCTIONS

__all__ = [
    "DeepSeekMoE",
    "ExpertChoiceMoE",
    "GatedFFN",
    "GptOssMoE",
    "MixtralMoE",
    "PlainFFN",
    "QwenMoE",
    "SwitchMoE",
]


class GatedFFN(nn.Module):
    """``down(act(gate(x)) * up(x))``; ``swiglu`` is GPT-OSS's clamped form."""

    def __init__(self, hidden: int, size: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(hidden, size, bias=bias)
        self.up = nn.Linear(hidden, size, bias=bias)
        self.down = nn.Linear(size, hidden, bias=bias)
        self.activation = activation
        self.alpha, self.limit = 1.702, 7.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate(x), self.up(x)
        if self.activation == "swiglu":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return self.down((up + 1) * gate * torch.sigmoid(gate * self.alpha))
        return self.down(PLAIN_ACTIVATION_FUNCTIONS[self.activation](gate) * up)


class PlainFFN(nn.Module):
    """``down(act(up(x)))``, the T5/Switch expert."""

    def __init__(self, hidden: int, size: int, activation: str = "relu", bias: bool = False):
        super().__init__()
        self.up = nn.Linear(hidden, size, bias=bias)
        self.down = nn.Linear(size, hidden, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(PLAIN_ACTIVATION_FUNCTIONS[self.activation](self.up(x)))


def _stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.stack([t.detach() for t in tensors])


class _ZooMoE(nn.Module, abc.ABC):
    """Router + experts; subclasses compute dense combine weights [B, S, E] in `combine_weights`."""

    def __init__(self, hidden: int, experts: list[nn.Module], router_bias: bool = False):
        super().__init__()
        self.router = nn.Linear(hidden, len(experts), bias=router_bias)
        self.experts = nn.ModuleList(experts)

    @abc.abstractmethod
    def combine_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 router logits [B, S, E] -> combine weights [B, S, E], zero where unchosen."""

    @abc.abstractmethod
    def spec(self) -> MoESpec:
        """This layer's configuration in the IR."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.combine_weights(self.router(x.float()))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens = weights[..., e] != 0
            if tokens.any():
                out[tokens] += expert(x[tokens]) * weights[..., e][tokens].unsqueeze(-1)
        return out + self.shared(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def to_moe(self) -> tuple[MoESpec, MoEWeights]:
        experts = list(self.experts)
        gated = isinstance(experts[0], GatedFFN)

        def bias(layer: nn.Linear) -> torch.Tensor | None:
            return None if layer.bias is None else layer.bias

        weights = MoEWeights(
            router_weight=self.router.weight.detach(),
            router_bias=None if self.router.bias is None else self.router.bias.detach(),
            w_gate=_stack([x.gate.weight for x in experts]) if gated else None,
            w_up=_stack([x.up.weight for x in experts]),
            w_down=_stack([x.down.weight for x in experts]),
            b_gate=_stack([bias(x.gate) for x in experts]) if gated else None,
            b_up=_stack([bias(x.up) for x in experts]),
            b_down=_stack([bias(x.down) for x in experts]),
        )
        return self.spec(), weights


class SwitchMoE(_ZooMoE):
    """Switch Transformer: top-1 softmax; each expert takes at most
    ``ceil(capacity_factor * S / E)`` tokens per sequence, earliest first; the rest pass through
    with no expert contribution."""

    def __init__(self, hidden=32, num_experts=8, expert_size=64, capacity_factor=1.25):
        super().__init__(hidden, [PlainFFN(hidden, expert_size) for _ in range(num_experts)])
        self.capacity_factor = capacity_factor

    def combine_weights(self, logits):
        probs = logits.softmax(-1)
        weight, expert = probs.max(-1)
        batch, seq, num_experts = probs.shape
        capacity = math.ceil(self.capacity_factor * seq / num_experts)
        out = torch.zeros_like(probs)
        for b in range(batch):
            served = [0] * num_experts
            for s in range(seq):
                e = int(expert[b, s])
                if served[e] < capacity:
                    served[e] += 1
                    out[b, s, e] = weight[b, s]
        return out

    def spec(self):
        return MoESpec(
            num_experts=len(self.experts),
            top_k=1,
            hidden_size=self.router.in_features,
            expert_size=self.experts[0].up.out_features,
            expert_kind="plain",
            activation="relu",
            capacity_factor=self.capacity_factor,
            capacity_scope="sequence",
        )


class MixtralMoE(_ZooMoE):
    """Mixtral: softmax over experts, top-2, renormalised; SwiGLU experts."""

    def __init__(self, hidden=32, num_experts=8, expert_size=64, top_k=2):
        super().__init__(hidden, [GatedFFN(hidden, expert_size) for _ in range(num_experts)])
        self.top_k = top_k

    def combine_weights(self, logits):
        weight, expert = logits.softmax(-1).topk(self.top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        return torch.zeros_like(logits).scatter(-1, expert, weight)

    def spec(self):
        return MoESpec(
            num_experts=len(self.experts),
            top_k=self.top_k,
            hidden_size=self.router.in_features,
            expert_size=self.experts[0].up.out_features,
            norm_topk_prob=True,
        )


class QwenMoE(_ZooMoE):
    """Qwen2-MoE: softmax, top-k without renormalisation, plus a shared expert scaled by
    ``sigmoid(x @ w_sg)``."""

    def __init__(self, hidden=32, num_experts=8, expert_size=32, top_k=4, shared_size=64):
        super().__init__(hidden, [GatedFFN(hidden, expert_size) for _ in range(num_experts)])
        self.top_k = top_k
        self.shared_expert = GatedFFN(hidden, shared_size)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def combine_weights(self, logits):
        weight, expert = logits.softmax(-1).topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, expert, weight)

    def shared(self, x):
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def spec(self):
        return MoESpec(
            num_experts=len(self.experts),
            top_k=self.top_k,
            hidden_size=self.router.in_features,
            expert_size=self.experts[0].up.out_features,
            shared_expert_size=self.shared_expert.up.out_features,
            shared_expert_gated=True,
        )

    def to_moe(self):
        spec, weights = super().to_moe()
        weights.shared_gate = self.shared_expert.gate.weight.detach()
        weights.shared_up = self.shared_expert.up.weight.detach()
        weights.shared_down = self.shared_expert.down.weight.detach()
        weights.shared_expert_gate = self.shared_expert_gate.weight.detach()
        return spec, weights


class DeepSeekMoE(_ZooMoE):
    """DeepSeek-V3: sigmoid scores; a correction bias steers the choice but not the weights;
    the best ``topk_group`` of ``n_group`` groups (scored by the sum of their top two) are
    searched for the top-k; weights renormalised, times ``routed_scaling_factor``; plus shared
    experts on every token."""

    def __init__(
        self,
        hidden=32,
        num_experts=16,
        expert_size=32,
        top_k=4,
        n_group=4,
        topk_group=2,
        shared_size=64,
        routed_scaling_factor=2.5,
    ):
        super().__init__(hidden, [GatedFFN(hidden, expert_size) for _ in range(num_experts)])
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.register_buffer("correction_bias", torch.randn(num_experts) * 0.05)
        self.shared_experts = GatedFFN(hidden, shared_size)

    def combine_weights(self, logits):
        scores = logits.sigmoid()
        choice = scores + self.correction_bias
        per_group = choice.view(*choice.shape[:-1], self.n_group, -1)
        group_score = per_group.topk(2, dim=-1).values.sum(-1)
        best_groups = group_score.topk(self.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_score).scatter(-1, best_groups, 1.0).bool()
        choice = per_group.masked_fill(~allowed.unsqueeze(-1), float("-inf")).flatten(-2)
        expert = choice.topk(self.top_k, dim=-1).indices
        weight = scores.gather(-1, expert)
        weight = weight / weight.sum(-1, keepdim=True) * self.routed_scaling_factor
        return torch.zeros_like(logits).scatter(-1, expert, weight)

    def shared(self, x):
        return self.shared_experts(x)

    def spec(self):
        return MoESpec(
            num_experts=len(self.experts),
            top_k=self.top_k,
            hidden_size=self.router.in_features,
            expert_size=self.experts[0].up.out_features,
            score="sigmoid",
            n_group=self.n_group,
            topk_group=self.topk_group,
            group_score="top2_sum",
            norm_topk_prob=True,
            routed_scaling_factor=self.routed_scaling_factor,
            shared_expert_size=self.shared_experts.up.out_features,
        )

    def to_moe(self):
        spec, weights = super().to_moe()
        weights.selection_bias = self.correction_bias.detach()
        weights.shared_gate = self.shared_experts.gate.weight.detach()
        weights.shared_up = self.shared_experts.up.weight.detach()
        weights.shared_down = self.shared_experts.down.weight.detach()
        return spec, weights


class GptOssMoE(_ZooMoE):
    """GPT-OSS: a router with bias, top-k of the logits then softmax over those k; experts with
    biases and the clamped SwiGLU (alpha 1.702, limit 7)."""

    def __init__(self, hidden=32, num_experts=8, expert_size=64, top_k=2):
        experts = [GatedFFN(hidden, expert_size, "swiglu", bias=True) for _ in range(num_experts)]
        super().__init__(hidden, experts, router_bias=True)
        self.top_k = top_k

    def combine_weights(self, logits):
        top, expert = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, expert, top.softmax(-1))

    def spec(self):
        return MoESpec(
            num_experts=len(self.experts),
            top_k=self.top_k,
            hidden_size=self.router.in_features,
            expert_size=self.experts[0].up.out_features,
            topk_before_softmax=True,
            activation="swiglu",
            swiglu_alpha=1.702,
            swiglu_beta=1.0,
            swiglu_limit=7.0,
        )


class ExpertChoiceMoE(_ZooMoE):
    """Expert choice: each expert takes the ``ceil(capacity_factor * S * k / E)`` tokens of a
    sequence with its highest softmax scores, weighted by those scores; GELU experts."""

    def __init__(self, hidden=32, num_experts=8, expert_size=64, top_k=2, capacity_factor=1.0):
        super().__init__(
            hidden, [PlainFFN(hidden, expert_size, "gelu") for _ in range(num_experts)]
        )
        self.top_k, self.capacity_factor = top_k, capacity_factor

    def combine_weights(self, logits):
        probs = logits.softmax(-1)
        seq, num_experts = probs.shape[-2:]
        capacity = min(seq, math.ceil(self.capacity_factor * seq * self.top_k / num_experts))
        out = torch.zeros_like(probs)
        for b in range(probs.shape[0]):
            for e in range(num_experts):
                tokens = probs[b, :, e].topk(capacity).indices
                out[b, tokens, e] = probs[b, tokens, e]
        return out

    def spec(self):
        return MoESpec(
            num_experts=len(self.experts),
            top_k=self.top_k,
            hidden_size=self.router.in_features,
            expert_size=self.experts[0].up.out_features,
            routing="expert_choice",
            capacity_factor=self.capacity_factor,
            expert_kind="plain",
            activation="gelu",
        )
