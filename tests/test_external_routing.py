"""External routing whose top-k ids repeat an expert within a token, as DeepSeek-V4's hash
routing does (a fixed token -> experts table): each slot is a pair of its own, so a repeated
expert's output is added once per slot, as transformers' loops add it. Every lowering must agree
with that, on several shapes (batch 1 and seq 1 included)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lowering_checks import assert_verified, compile_with_lowering
from moe_cases import CASES, H, random_weights
from oracle import oracle_moe
from torch import nn

import moec
from moec import registry
from moec.compiler.moe_block import MoEExpertsBlock
from moec.ir import moe_eager

BUCKETS = 16
CASE = "qwen-shared-gated"  # 8 gated experts, top-4, a gated shared expert
SPEC = dataclasses.replace(CASES[CASE], routing="external")


def _weights():
    return dataclasses.replace(random_weights(CASE, seed=3), router_weight=None)


class HashRouted(nn.Module):
    """A family's own router: each token's experts come from a fixed table, looked up by a
    bucket of the token's first feature; half the table's rows repeat an expert. The weights
    are the router's sigmoid scores at those experts, renormalised."""

    def __init__(self):
        super().__init__()
        e, k = SPEC.num_experts, SPEC.top_k
        g = torch.Generator().manual_seed(0)
        table = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(BUCKETS)])
        table[::2, 1] = table[::2, 0]  # a repeated expert in every other row
        table[::4, 2] = table[::4, 0]  # and thrice in every fourth
        self.register_buffer("table", table)
        self.router = nn.Linear(H, e, bias=False)
        self.experts = MoEExpertsBlock(SPEC, _weights())

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bucket = (x[..., 0] * 1000).long().remainder(BUCKETS)
        ids = self.table[bucket]  # [..., k]
        gates = self.router(x).sigmoid().gather(-1, ids)
        return ids, gates / gates.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, gates = self.routing(x)
        k = SPEC.top_k
        out = self.experts(x.reshape(-1, H), ids.reshape(-1, k), gates.reshape(-1, k))
        return out.reshape(x.shape)


def test_the_table_repeats_experts():
    ids, _ = HashRouted().routing(torch.randn(2, 32, H))
    distinct = torch.tensor([len(set(row.tolist())) for row in ids.reshape(-1, SPEC.top_k)])
    assert (distinct < SPEC.top_k).any() and (distinct == SPEC.top_k).any()


@pytest.mark.parametrize("mapped", [False, True], ids=["ids", "expert-map"])
def test_a_repeated_expert_counts_once_per_slot(mapped):
    """The op's kernel, from the ids (sorted pairs) and through an identity expert map (dense
    routing), against the oracle's loop over slots."""
    spec = dataclasses.replace(SPEC, expert_map=tuple(range(SPEC.num_experts))) if mapped else SPEC
    model, x = HashRouted(), torch.randn(2, 12, H)
    ids, gates = model.routing(x)
    out, chosen = moe_eager(spec, _weights(), x, ids, gates)
    expected = oracle_moe(SPEC, _weights(), x, routed=(ids, gates))
    assert torch.allclose(out.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(chosen, torch.zeros_like(chosen).scatter(-1, ids, True))


@pytest.mark.parametrize("lowering", registry.lowering_names())
def test_every_lowering_adds_a_repeated_expert_per_slot(tmp_path, lowering):
    model = HashRouted().eval()
    result = compile_with_lowering(model, (torch.randn(2, 8, H),), SPEC, lowering, tmp_path / "a")
    if result is not None:
        assert_verified(moec.verify(result.path, source=model), blocks=1)
