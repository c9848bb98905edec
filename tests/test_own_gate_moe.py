"""User MoE blocks whose forward takes more than the hidden states: read by `OwnGateAdapter`,
their gate kept as their own exported ops, the experts one ``moec::moe`` node."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moec
from moec.models import find_moe_blocks
from moec.models.block_calls import recorded_block_calls
from moec.models.own_gate_moe import GateReader

H, C, E = 16, 4, 6


class Expert(nn.Module):
    def __init__(self, hidden=H):
        super().__init__()
        self.w1 = nn.Linear(hidden, 24, bias=False)
        self.w2 = nn.Linear(24, hidden, bias=False)
        self.w3 = nn.Linear(hidden, 24, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class ContextGatedMoE(nn.Module):
    """JetMoE-style context-aware gate, experts run in a Python loop on their own tokens."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H + C, E)
        self.experts = nn.ModuleList(Expert() for _ in range(E))

    def forward(self, x, context):
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        logits = self.gate(torch.cat([x, context], -1)).reshape(-1, E)
        weight, ids = logits.softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out = out.index_add(0, token, expert(flat[token]) * weight[token, slot, None])
        return out.reshape(b, t, h)


class TaskMaskedMoE(nn.Module):
    """A task id biases the router, experts combined with masks, a shared expert, and the
    padded tokens' output zeroed by a mask."""

    def __init__(self, hidden=H, experts=E):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.task_bias = nn.Parameter(torch.randn(3, experts))
        self.experts = nn.ModuleList(Expert(hidden) for _ in range(experts))
        self.shared = Expert(hidden)

    def forward(self, x, task, mask):
        logits = self.router(x) + self.task_bias[task][:, None, :]
        weight, ids = logits.sigmoid().topk(3, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        out = self.shared(x)
        for e, expert in enumerate(self.experts):
            out = out + (weight * (ids == e)).sum(-1, keepdim=True) * expert(x)
        return out * mask[..., None]


class ContextLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.context = nn.Linear(H, C)
        self.moe = ContextGatedMoE()
        self.head = nn.Linear(H, 8)

    def forward(self, x):
        return self.head(x + self.moe(x, torch.tanh(self.context(x))))


class TaskLM(nn.Module):
    def __init__(self, block=TaskMaskedMoE):
        super().__init__()
        torch.manual_seed(0)
        self.moe = block()
        self.head = nn.Linear(H, 8)

    def forward(self, x, task, mask):
        return self.head(x + self.moe(x, task, mask))


def _task_inputs(batch=2, seq=8):
    mask = torch.ones(batch, seq)
    mask[-1, :3] = 0
    return torch.randn(batch, seq, H), torch.arange(batch) % 3, mask


@pytest.mark.parametrize("target", ["ort", "onnx", "torch"])
def test_context_gated_block_with_an_expert_loop_compiles_and_verifies(tmp_path, target):
    model = ContextLM().eval()
    art = moec.compile(model, (torch.randn(2, 8, H),), target=target, output=tmp_path / "o")
    (block,) = art.blocks
    assert block.adapter == "own-gate" and block.lowering not in ("subgraph", "fused")
    if target == "ort":  # the gate's weights may have any sign; ORT's op takes a softmax's
        assert "negative weights" in art.manifest.blocks[0]["reason"]
    assert "top-2 by the block's own router" in block.summary
    report = moec.verify(art.path, source=model)
    assert report and report.outputs[0].rel_l2 < 1e-5, report.to_dict()
    assert report.routing[0].agreement == 1.0


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_task_id_and_mask_inputs_with_masked_experts_compile_and_verify(tmp_path, target):
    model = TaskLM().eval()
    art = moec.compile(model, _task_inputs(), target=target, output=tmp_path / "o")
    assert [b.adapter for b in art.blocks] == ["own-gate"]
    report = moec.verify(art.path, source=model)
    assert report and report.outputs[0].rel_l2 < 1e-5, report.to_dict()
    assert report.routing[0].agreement == 1.0


def test_the_gate_reader_gives_the_blocks_own_weights_with_more_experts_than_hidden_units():
    torch.manual_seed(0)
    block = TaskMaskedMoE(hidden=4, experts=6).eval()  # unit rows in two passes of 4
    x, task, mask = _task_inputs()
    x = x[..., :4]
    with torch.no_grad():
        logits = block.router(x) + block.task_bias[task][:, None, :]
        weight, ids = logits.sigmoid().topk(3, dim=-1)
        expected = torch.zeros_like(logits).scatter(-1, ids, weight / weight.sum(-1, True))
        expected = (expected * mask[..., None]).reshape(-1, 6)
        reader = GateReader(block, "experts", hidden=4, top_k=3)
        dense, rest = reader.dense_weights(x, task, mask)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rest, block.shared(x) * mask[..., None])


class NormedInputMoE(ContextGatedMoE):
    """Its experts read a normalised copy of the input, not the input: not what moec reads."""

    def forward(self, x, context):
        return super().forward(nn.functional.layer_norm(x, (H,)), context)


def test_a_block_the_reading_does_not_reproduce_runs_as_the_models_own_ops(tmp_path):
    model = ContextLM().eval()
    model.moe = NormedInputMoE()
    art = moec.compile(model, (torch.randn(2, 8, H),), target="onnx", output=tmp_path / "o")
    assert art.blocks == []
    (note,) = [n for n in art.notes if "moe (NormedInputMoE)" in n]
    assert "does not reproduce its output" in note and "runs as the model's own ops" in note
    assert moec.verify(art.path, source=model)


def test_without_a_call_the_block_is_refused_with_the_reason():
    refused: dict[str, str] = {}
    assert find_moe_blocks(ContextLM(), refused) == []
    assert "takes more than the hidden states" in refused["moe"]
    model = ContextLM()
    with recorded_block_calls(model, (torch.randn(1, 3, H),)):
        (match,) = find_moe_blocks(model)
    assert match.adapter == "own-gate" and match.spec.top_k == 2


def context_lm():
    """`pkg.module:factory` source of ContextLM (for the CLI)."""
    return ContextLM().eval(), (torch.randn(2, 8, H),)


def normed_context_lm():
    model = ContextLM().eval()
    model.moe = NormedInputMoE()
    return model, (torch.randn(2, 8, H),)


def test_inspect_shows_a_gated_block_or_why_it_is_not_converted(monkeypatch):
    from click.testing import CliRunner

    from moec.cli import main

    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(main, ["inspect", "test_own_gate_moe:context_lm"])
    assert result.exit_code == 0, result.output
    assert "ContextGatedMoE" in result.output and "1 MoE block(s)" in result.output
    result = CliRunner().invoke(main, ["inspect", "test_own_gate_moe:normed_context_lm"])
    assert result.exit_code == 0, result.output
    assert "0 MoE block(s)" in result.output
    assert "not converted (it would run as the model's own ops): MoE block moe" in result.output
