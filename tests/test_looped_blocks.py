"""A block the model runs more than once per forward (a looped layer): one ``moec::moe`` node
and one routing output per call, the weights stored once, each call verified against the same
call of the eager model."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import moec
from moec.models.zoo_layers import MixtralMoE

H = 16


class LoopedLM(nn.Module):
    """One MoE block applied ``passes`` times, as looped (recurrent-depth) models do."""

    def __init__(self, passes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.moe = MixtralMoE(hidden=H, num_experts=4, expert_size=32)
        self.norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, 8)
        self.passes = passes

    def forward(self, x):
        for _ in range(self.passes):
            x = x + self.moe(self.norm(x))
        return self.head(x)


@pytest.mark.parametrize("target", ["ort", "onnx", "torch"])
def test_each_call_of_a_looped_block_is_a_node_verified_against_its_eager_call(tmp_path, target):
    model = LoopedLM().eval()
    art = moec.compile(model, (torch.randn(2, 8, H),), target=target, output=tmp_path / "o")
    assert [b.name for b in art.blocks] == ["moe"] * 3
    assert any("moe runs 3 times per forward" in n for n in art.notes), art.notes
    routing = [o for o in art.manifest.outputs if o.role == "routing"]
    assert [(o.name, o.block) for o in routing] == [(f"routing.{i}", "moe") for i in range(3)]
    report = moec.verify(art.path, source=model)
    assert report and report.outputs[0].rel_l2 < 1e-5, report.to_dict()
    assert [s.block for s in report.routing] == ["moe", "moe#2", "moe#3"]
    assert all(s.agreement == 1.0 for s in report.routing)
    if target != "torch":  # the weights, and their folded layout (ORT's interleaved FC1), once
        graph = onnx.load(art.path / "model.onnx", load_external_data=False).graph
        expert_weights = [i for i in graph.initializer if len(i.dims) == 3]
        assert len(expert_weights) == (2 if target == "ort" else 0), [
            (i.name, i.dims) for i in expert_weights
        ]


def test_each_call_routes_anew_so_a_wrong_call_order_would_be_caught():
    """The calls route differently here, so pairing the outputs with the wrong eager call (or
    one call with all) would lower the agreement: the test above can fail."""
    model = LoopedLM().eval()
    seen = []
    model.moe.register_forward_hook(lambda m, args, out: seen.append(m.router(args[0]).argmax(-1)))
    with torch.no_grad():
        model(torch.randn(2, 8, H))
    assert len(seen) == 3 and not torch.equal(seen[0], seen[1])
