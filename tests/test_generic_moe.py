"""User-defined MoE blocks: the generic recogniser, module experts, and the adapter API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import moec
from moec.models import find_moe_blocks
from moec.models.adapters import ADAPTERS

H = 16


class SwiGLUExpert(nn.Module):  # names that say nothing about which Linear is the gate
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(H, 24, bias=False)
        self.w2 = nn.Linear(24, H, bias=False)
        self.w3 = nn.Linear(H, 24, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class NormExpert(nn.Module):  # not an FFN
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.proj = nn.Linear(H, H)

    def forward(self, x):
        return torch.tanh(self.proj(self.norm(x))) * 2


class UserMoE(nn.Module):
    def __init__(self, expert=SwiGLUExpert, k=2, score="softmax", temperature=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(H, 6, bias=True)
        self.experts = nn.ModuleList(expert() for _ in range(6))
        self.k, self.score, self.temperature = k, score, temperature

    def forward(self, x):
        logits = self.gate(x) / self.temperature
        probs = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        weight, idx = probs.topk(self.k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w_e = (weight * (idx == e)).sum(-1, keepdim=True)
            out = out + w_e * expert(x)
        return out


class UserLM(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moe = UserMoE(**kw)

    def forward(self, x):
        return self.moe(torch.relu(self.inp(x)))


def test_routing_and_ffn_experts_are_found_by_probing():
    (block,) = find_moe_blocks(UserLM(score="sigmoid", k=3))
    assert block.adapter == "generic" and block.name == "moe"
    spec = block.spec
    assert (spec.score, spec.top_k, spec.norm_topk_prob) == ("sigmoid", 3, True)
    assert (spec.expert_kind, spec.activation, spec.expert_size) == ("gated", "silu", 24)
    assert torch.equal(block.weights.w_gate[2], block.module.experts[2].w1.weight)


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_user_ffn_moe_compiles_and_verifies(tmp_path, target):
    model = UserLM().eval()
    art = moec.compile(model, (torch.randn(2, 8, H),), target=target, output=tmp_path / "o")
    assert art.blocks[0].lowering in (("fused", "gather") if target == "ort" else ("gather",))
    report = moec.verify(art.path, source=model)
    assert report and report.outputs[0].rel_l2 < 1e-5 and report.routing[0].agreement == 1.0


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_module_experts_take_the_gather_subgraph_scatter_path(tmp_path, target):
    model = UserLM(expert=NormExpert, k=2).eval()
    (block,) = find_moe_blocks(model)
    assert block.spec.expert_kind == "module" and block.expert_modules is model.moe.experts
    art = moec.compile(model, (torch.randn(2, 8, H),), target=target, output=tmp_path / "o")
    assert art.blocks[0].lowering == "subgraph"
    assert "gather" in art.manifest.blocks[0]["reason"]
    report = moec.verify(art.path, source=model)
    assert report and report.outputs[0].rel_l2 < 1e-5, report.to_dict()


def test_unrecognised_routing_runs_as_the_models_own_ops_with_the_reason(tmp_path):
    model = UserLM(temperature=3.0).eval()  # softmax(logits / 3): no probed style matches
    art = moec.compile(model, (torch.randn(2, 8, H),), output=tmp_path / "o")
    assert art.blocks == []
    (note,) = [n for n in art.notes if "MoE block moe (UserMoE)" in n]
    assert "register an adapter" in note and note.endswith("it runs as the model's own ops")
    assert moec.verify(art.path, source=model)


def test_modules_that_only_look_like_a_router_and_layers_are_left_alone():
    class TwoLayerNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(H, 2)
            self.layers = nn.ModuleList(nn.Linear(H, H) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    assert find_moe_blocks(TwoLayerNet()) == []


def test_the_adapter_example_in_the_docs_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "docs" / "adapters.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(code.splitlines()) < 60
    monkeypatch.chdir(tmp_path)
    before = list(ADAPTERS)
    try:
        exec(compile(code, "docs/adapters.md", "exec"), {"__name__": "docs_example"})
    finally:
        ADAPTERS[:] = before
    assert (tmp_path / "temperature-moe-out" / "manifest.json").is_file()


class TinySharedExperts(nn.Module):  # every token runs them: nothing routes
    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(2, 8, H))


class OpaqueMoE(nn.Module):  # named like an MoE block, but no adapter reads it
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, H))


def test_modules_named_like_moe_blocks_are_reported_but_shared_experts_are_not():
    from moec.compiler.capture import unconverted_moe_modules

    model = nn.ModuleDict({"shared_experts": TinySharedExperts(), "moe": OpaqueMoE()})
    assert unconverted_moe_modules(model, []) == [("moe", "OpaqueMoE")]
