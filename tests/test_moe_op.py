"""The moec::moe eager kernel against the float64 oracle, and the zoo layers against the op."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from moe_cases import CASES, H, random_weights
from oracle import oracle_moe

from moec.errors import SpecError
from moec.ir import MoESpec, moe_eager
from moec.models import build_zoo, find_moe_blocks, zoo_names

SHAPES = [(1, 1), (1, 9), (3, 16)]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_eager_kernel_matches_float64_oracle(case, shape):
    spec, weights = CASES[case], random_weights(case)
    x = torch.randn(*shape, H, generator=torch.Generator().manual_seed(shape[1]))
    out, chosen = torch.ops.moec.moe(x, None, None, *weights.args(), spec.to_json())
    expected = oracle_moe(spec, weights, x)
    assert out.shape == x.shape and chosen.shape == (*shape, spec.num_experts)
    assert rel_l2(out, expected) < 1e-5
    if spec.routing == "topk" and not spec.has_capacity:
        served = chosen.sum(-1)  # merged experts: two of a token's k can be one stored expert
        assert (
            (served == spec.top_k).all()
            if spec.expert_map is None
            else (served <= spec.top_k).all()
        )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_routing_given_as_ids_is_grouped_like_dense_routing(shape):
    """External routing is grouped from the ids with one sort; through an identity expert map
    it takes the dense path (scatter, then nonzero). Both give the same bits."""
    spec = dataclasses.replace(CASES["qwen-shared-gated"], routing="external")
    weights = dataclasses.replace(random_weights("qwen-shared-gated"), router_weight=None)
    dense = dataclasses.replace(spec, expert_map=tuple(range(spec.num_experts)))
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, H, generator=g)
    ids = torch.rand(*shape, spec.num_experts, generator=g).topk(spec.top_k, dim=-1).indices
    gates = torch.rand(*shape, spec.top_k, generator=g)
    out, chosen = moe_eager(spec, weights, x, ids, gates)
    expected, expected_chosen = moe_eager(dense, weights, x, ids, gates)
    assert torch.equal(out, expected) and torch.equal(chosen, expected_chosen)


def test_capacity_drops_tokens_in_position_order():
    spec = CASES["switch-capacity"]  # 8 experts, top-1, capacity ceil(1.25 * S / 8)
    weights = random_weights("switch-capacity")
    weights.router_weight = torch.zeros_like(weights.router_weight)
    weights.router_weight[3] = 1.0  # every token with a positive sum goes to expert 3
    x = torch.ones(1, 16, H)
    _, chosen = moe_eager(spec, weights, x)
    capacity = spec.capacity(16)
    assert capacity == 3
    assert chosen[0, :, 3].tolist() == [True] * capacity + [False] * (16 - capacity)


def test_two_dimensional_input_is_one_sequence():
    spec, weights = CASES["switch-capacity"], random_weights("switch-capacity")
    x = torch.randn(12, H)
    out2d, chosen2d = moe_eager(spec, weights, x)
    out3d, chosen3d = moe_eager(spec, weights, x.unsqueeze(0))
    torch.testing.assert_close(out2d, out3d[0])
    assert torch.equal(chosen2d, chosen3d[0])


@pytest.mark.parametrize("name", zoo_names())
def test_zoo_model_equals_its_op_form(name):
    """Each zoo block's own forward (its routing written independently) equals the op."""
    source = build_zoo(name, seq=11)
    blocks = find_moe_blocks(source.model)
    assert blocks, name
    diffs = []

    def check(block):
        def hook(module, args, out):
            ref, _ = moe_eager(block.spec, block.weights, args[0])
            diffs.append(rel_l2(out, ref))

        return hook

    handles = [b.module.register_forward_hook(check(b)) for b in blocks]
    with torch.no_grad():
        source.model(*source.example_inputs)
    for h in handles:
        h.remove()
    assert len(diffs) == len(blocks)
    assert max(diffs) < 1e-6


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"top_k": 9}, "top_k=9 > router experts"),
        ({"score": "tanh"}, "score='tanh'"),
        ({"n_group": 3}, "router experts must split"),
        ({"n_group": 4, "topk_group": 1, "top_k": 3}, "fewer than top_k"),
        ({"expert_capacity": 2, "capacity_factor": 1.0}, "not both"),
        ({"activation": "swiglu", "expert_kind": "plain"}, "gated activation"),
        ({"topk_before_softmax": True, "score": "sigmoid"}, "implies score='softmax'"),
        ({"activation_limit": 7.0, "expert_kind": "plain"}, "on gated experts"),
        ({"activation_limit": 7.0, "activation": "swiglu"}, "swiglu takes no activation_limit"),
        ({"gate_on_input": True, "expert_kind": "module"}, "applies to FFN experts"),
        ({"activation": "swiglu_softcap", "gate_softcap": 4.0}, "softcaps must be > 0"),
        ({"gate_softcap": 4.0, "up_softcap": 25.0}, "are swiglu_softcap's"),
    ],
)
def test_inconsistent_spec_is_refused(changes, message):
    fields = dict(num_experts=8, top_k=2, hidden_size=H, expert_size=4)
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        MoESpec(**{**fields, **changes})


def test_weights_of_the_wrong_shape_are_refused():
    spec, weights = CASES["mixtral"], random_weights("mixtral")
    weights.w_down = weights.w_down[:, :, :-1]
    with pytest.raises(SpecError, match="w_down has shape"):
        weights.check(spec)


def test_spec_round_trips_through_json():
    for spec in CASES.values():
        assert MoESpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecError, match="no field"):
        MoESpec.from_json('{"num_experts": 2, "bogus": 1}')
