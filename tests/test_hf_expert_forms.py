"""Experts modules whose form moec reads by probing: Inkling2's softcapped SwiGLU and the
post-expert RMS norms (MuseSpark's scale-then-normalise, normalise-then-scale, and Ergo's
weight row per expert), each
converted and checked against the module's own forward on random routing; and the families'
whole models compiled for ort and onnx."""

from __future__ import annotations

import pytest
import torch
from hf_families import build_tiny, save_tiny
from torch import nn

import moec
from moec.errors import UnsupportedBlockError
from moec.ir import moe_eager
from moec.models.hf_experts import HFExpertsAdapter


def _experts(family: str) -> nn.Module:
    return build_tiny(family).model.get_decoder().layers[0].mlp.experts


def _rel_error_on_random_routing(module: nn.Module) -> tuple[float, object]:
    spec, weights = HFExpertsAdapter().convert(module)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[:2] for _ in range(24)])
    gates = torch.rand(24, 2, generator=g)
    with torch.no_grad():
        theirs = module(x, ids, gates)
        ours = moe_eager(spec, weights, x, ids, gates)[0]
    return float((ours - theirs).norm() / theirs.norm()), spec


def test_softcapped_swiglu_is_probed_with_its_caps():
    error, spec = _rel_error_on_random_routing(_experts("inkling2"))
    assert (spec.activation, spec.gate_softcap, spec.up_softcap) == ("swiglu_softcap", 4.0, 25.0)
    assert error < 1e-5


def test_scale_then_normalise_post_norm_folds_into_the_down_projection():
    experts = _experts("muse_spark")
    with torch.no_grad():  # the tiny model's norm weight is zero: make its scale count
        experts.post_expert_norm.weight.normal_(0, 0.5)
        experts.down_proj.mul_(1e-2)  # outputs small enough that the eps (1e-8) is not lost
    error, spec = _rel_error_on_random_routing(experts)
    assert spec.post_expert_norm_eps == experts.post_expert_norm.eps
    assert error < 1e-5


class NormThenScale(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, y):
        return (
            y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight
        )


class RoutedNorm(nn.Module):
    """A norm called with the expert ids that does not normalise: not one moec reads."""

    eps = 1e-6

    def forward(self, y, expert_ids):
        return y


def test_normalise_then_scale_post_norm_is_a_post_norm_weight():
    experts = _experts("muse_spark")
    experts.post_expert_norm = NormThenScale(experts.down_proj.shape[1])
    error, _ = _rel_error_on_random_routing(experts)
    _, weights = HFExpertsAdapter().convert(experts)
    assert torch.equal(weights.post_norm_weight[3], experts.post_expert_norm.weight.detach())
    assert error < 1e-5


def test_post_norm_moec_cannot_read_is_refused():
    experts = _experts("muse_spark")
    experts.post_expert_norm = RoutedNorm()
    with pytest.raises(UnsupportedBlockError, match="matches none of the RMS norms"):
        HFExpertsAdapter().convert(experts)


def test_post_norm_with_a_weight_row_per_expert_is_read_per_expert():
    """Ergo's subclass normalises each route's output and scales it by its expert's row."""
    experts = _experts("ergo")
    with torch.no_grad():
        experts.post_expert_norm.weight.uniform_(0.5, 1.5)
    error, spec = _rel_error_on_random_routing(experts)
    _, weights = HFExpertsAdapter().convert(experts)
    assert spec.post_expert_norm_eps == experts.post_expert_norm.eps
    assert torch.equal(weights.post_norm_weight, experts.post_expert_norm.weight.detach())
    assert error < 1e-5


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("family", ["inkling2", "muse_spark", "ergo"])
def test_family_compiles_and_verifies(tmp_path, family, target):
    src = save_tiny(family, tmp_path / "model")
    result = moec.compile(f"hf:{src}", target=target, output=tmp_path / "out")
    assert len(result.blocks) == 2
    assert {b.lowering for b in result.blocks} == {"gather"}  # no fused op for either form
    report = moec.verify(result.path)
    assert report, report
