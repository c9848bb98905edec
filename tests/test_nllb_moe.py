"""NLLB-MoE's sparse MLP converts to a top-2 renormalised softmax block with the token-dropout
scale folded into its experts, and verifies against a block whose forward computes NLLB's
routing; transformers 5.x's own block (which runs experts 0 and 1 only) is refused by name."""

from __future__ import annotations

import pytest
import torch
from hf_families import build_tiny, save_tiny
from transformers.models.nllb_moe import modeling_nllb_moe

import moec
from moec.errors import CaptureError
from moec.models import find_moe_blocks


def _top2_experts(self, hidden_states, router_mask, router_probs):
    """NllbMoeExperts as NLLB means it (transformers 4.x): every expert weighted by its gate."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        expert = self[f"expert_{e}"](hidden_states) * (1 - self.moe_token_dropout)
        out = out + router_probs[:, e : e + 1] * expert
    return out


@pytest.fixture
def top2_experts(monkeypatch):
    monkeypatch.setattr(modeling_nllb_moe.NllbMoeExperts, "forward", _top2_experts)


def test_transformers_own_block_is_refused_with_the_reason(tmp_path):
    refused: dict[str, str] = {}
    assert find_moe_blocks(build_tiny("nllb_moe"), refused) == []
    assert all("only experts 0 and 1 run" in reason for reason in refused.values())
    with pytest.raises(CaptureError, match="only experts 0 and 1 run"):  # its own ops: no export
        moec.compile(f"hf:{save_tiny('nllb_moe', tmp_path / 'model')}", output=tmp_path / "o")


def test_random_second_expert_is_refused(top2_experts):
    model = build_tiny("nllb_moe")
    model.model.encoder.layers[0].ffn.router.second_expert_policy = "sampling"
    refused: dict[str, str] = {}
    find_moe_blocks(model, refused)
    assert "at random" in refused["model.encoder.layers.0.ffn"]


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_top2_block_compiles_and_verifies(top2_experts, tmp_path, target):
    directory = save_tiny("nllb_moe", tmp_path / "model")
    result = moec.compile(f"hf:{directory}", target=target, output=tmp_path / "out")
    assert len(result.blocks) == 4
    assert {b.adapter for b in result.blocks} == {"hf-nllb-moe"}
    report = moec.verify(result.path)
    assert report, report.to_dict()
    assert max(o.rel_l2 for o in report.outputs) < 1e-5
