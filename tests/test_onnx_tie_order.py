"""An ONNX artifact is checked against an eager reference that breaks top-k ties as ONNX's TopK
does (lower index first); PyTorch's CPU kernel orders them otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moec
from moec.onnx_tie_order import OnnxTopkTies, stable_topk


class TiedSelection(nn.Module):
    """Keeps 4 of 13 features by a score that ties exactly (a model's own top-k, as Doge's
    dynamic mask over keys that score the same)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(13, 3)

    def forward(self, x):
        scores = torch.exp(0.0 * x.sum(1))  # [batch, 13], all equal
        keep = scores.topk(4, dim=-1, sorted=False).indices
        mask = torch.zeros_like(scores).scatter(-1, keep, 1.0)
        return self.head(x * mask[:, None, :])


def test_pytorch_and_onnx_order_ties_differently_here():
    ties = torch.ones(2, 13)
    assert torch.topk(ties, 4).indices[0].tolist() != [0, 1, 2, 3]  # else this file tests nothing
    with OnnxTopkTies():
        assert torch.topk(ties, 4).indices[0].tolist() == [0, 1, 2, 3]
        assert ties.topk(2, largest=False).indices[1].tolist() == [0, 1]


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("largest", [True, False])
def test_stable_topk_is_topk_where_nothing_ties(dim, largest):
    x = torch.randn(3, 5, 7)
    expected, got = torch.topk(x, 2, dim=dim, largest=largest), stable_topk(x, 2, dim, largest)
    assert torch.equal(expected.values, got.values) and torch.equal(expected.indices, got.indices)


def test_an_onnx_artifact_of_a_model_taking_a_tied_top_k_verifies(tmp_path):
    model = TiedSelection().eval()
    art = moec.compile(model, (torch.randn(2, 6, 13),), target="onnx", output=tmp_path / "o")
    report = moec.verify(art.path, source=model)
    assert report and report.outputs[0].rel_l2 < 1e-6, report.to_dict()
