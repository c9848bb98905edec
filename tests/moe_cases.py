"""MoE block configurations covering every routing family, with random weights, for tests."""

from __future__ import annotations

import dataclasses

import torch

from moec.ir import MoESpec, MoEWeights

H = 16


def spec(**kw) -> MoESpec:
    base = dict(num_experts=8, top_k=2, hidden_size=H, expert_size=24)
    base.update(kw)
    return MoESpec(**base)


CASES: dict[str, MoESpec] = {
    "switch-capacity": spec(top_k=1, expert_kind="plain", activation="relu", capacity_factor=1.25),
    "switch-batch-capacity": spec(
        top_k=1, expert_kind="plain", activation="relu", expert_capacity=2, capacity_scope="batch"
    ),
    "top2-capacity": spec(capacity_factor=1.0),
    "mixtral": spec(norm_topk_prob=True),
    "qwen-shared-gated": spec(top_k=4, shared_expert_size=32, shared_expert_gated=True),
    "deepseek-v3": spec(
        num_experts=16,
        top_k=4,
        score="sigmoid",
        n_group=4,
        topk_group=2,
        group_score="top2_sum",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        shared_expert_size=32,
    ),
    "deepseek-v2": spec(
        num_experts=16,
        top_k=3,
        n_group=4,
        topk_group=2,
        group_score="max",
        routed_scaling_factor=1.5,
    ),
    "sigmoid-top1": spec(top_k=1, score="sigmoid"),
    "softmax-bias": spec(norm_topk_prob=True),
    "gpt-oss": spec(
        topk_before_softmax=True,
        activation="swiglu",
        swiglu_alpha=1.702,
        swiglu_beta=1.0,
        swiglu_limit=7.0,
    ),
    "swiglu-clamped": spec(activation="swiglu", swiglu_limit=0.5, norm_topk_prob=True),
    "plain-relu2": spec(expert_kind="plain", activation="relu2"),
    "expert-choice": spec(
        routing="expert_choice", capacity_factor=1.0, expert_kind="plain", activation="gelu"
    ),
    "plain-gelu-tanh": spec(expert_kind="plain", activation="gelu_tanh"),
    "plain-silu-scores-none": spec(expert_kind="plain", activation="silu", score="none"),
    "gated-gelu": spec(activation="gelu"),
    "silu-capped": spec(activation_limit=0.5),  # Step-3.7: min(silu(gate), L) * clamp(up, ±L)
    # Inkling2: tanh softcaps on the linear gate factor and on up; small caps that bite
    "swiglu-softcap": spec(activation="swiglu_softcap", gate_softcap=0.5, up_softcap=0.8),
    # MuseSpark, Ergo: each expert's output RMS-normalised (and scaled) before its gate
    "post-norm": spec(norm_topk_prob=True, post_expert_norm_eps=1e-8),
    # compressed blocks: 8 router experts onto 5 stored ones (two merged pairs, one pruned)
    "merged-mixtral": spec(
        num_experts=5, norm_topk_prob=True, expert_map=(0, 1, 2, 0, 3, -1, 4, 1)
    ),
    # Llama 4: the routing weight scales each expert's input, not its output
    "llama4": spec(top_k=1, score="sigmoid", gate_on_input=True, shared_expert_size=32),
    "input-gated-biases": spec(norm_topk_prob=True, gate_on_input=True),
    "input-gated-capacity": spec(capacity_factor=1.0, gate_on_input=True),
    "input-gated-expert-choice": spec(
        routing="expert_choice",
        capacity_factor=1.0,
        expert_kind="plain",
        activation="gelu",
        gate_on_input=True,
    ),
    "merged-switch-capacity": spec(
        num_experts=4,
        top_k=1,
        expert_kind="plain",
        activation="relu",
        capacity_factor=1.25,
        expert_map=(0, 1, 2, 3, 3, 2, 1, 0),
    ),
}
# the DeepSeek-V3 routing (groups, selection bias) over 16 router experts onto 12 stored ones
CASES["merged-deepseek-v3"] = dataclasses.replace(
    CASES["deepseek-v3"], num_experts=12, expert_map=(*range(12), 0, 1, -1, 11)
)
# cases whose weights carry biases or a selection bias
WITH_BIASES = {"gpt-oss", "plain-gelu-tanh", "input-gated-biases", "post-norm"}
WITH_SELECTION_BIAS = {"deepseek-v3", "merged-deepseek-v3", "softmax-bias"}


def random_weights(name: str, seed: int = 0, shape: MoESpec | None = None) -> MoEWeights:
    """Weights of case ``name`` (biases as it has them) for ``shape`` (default: its spec)."""
    s = shape or CASES[name]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return torch.randn(*shape, generator=g) * scale

    e, i, h, sh = s.num_experts, s.expert_size, s.hidden_size, s.shared_expert_size
    r = s.router_experts
    gated = s.expert_kind == "gated"
    biases = name in WITH_BIASES
    w = MoEWeights(
        router_weight=rand(r, h, scale=1.0),
        w_gate=rand(e, i, h) if gated else None,
        w_up=rand(e, i, h),
        w_down=rand(e, h, i),
        router_bias=rand(r, scale=0.5) if biases else None,
        selection_bias=rand(r, scale=0.3) if name in WITH_SELECTION_BIAS else None,
        b_gate=rand(e, i, scale=0.1) if biases and gated else None,
        b_up=rand(e, i, scale=0.1) if biases else None,
        b_down=rand(e, h, scale=0.1) if biases else None,
        output_bias=rand(h, scale=0.1) if biases else None,
    )
    if s.post_expert_norm_eps is not None:  # outputs small enough that the eps counts
        w.post_norm_weight = 1 + rand(e, h, scale=0.5)
        w.w_down = w.w_down * 1e-4
        w.b_down = None if w.b_down is None else w.b_down * 1e-4
    if sh:
        w.shared_gate, w.shared_up, w.shared_down = rand(sh, h), rand(sh, h), rand(h, sh)
        if s.shared_expert_gated:
            w.shared_expert_gate = rand(1, h)
    w.check(s)
    return w
