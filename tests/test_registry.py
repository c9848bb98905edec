"""Targets and lowerings are registered, not string-matched: a toy target and a toy lowering
defined in this file alone compile, load, verify and show up in the CLI's choices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import moec
from moec import registry
from moec.cli import main
from moec.errors import ArtifactError, LoweringError, MoecError, TargetNotBuiltError
from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import MoEWeights
from moec.models import build_zoo
from moec.registry import Lowering, Prefer, Target
from moec.runtime.runner import Runner

KERNEL_CALLS: list[list[int]] = []


def loop_experts(spec: MoESpec, w: MoEWeights, rows: torch.Tensor, counts: list[int]):
    """The toy lowering's kernel: each expert on its rows in a plain Python loop."""
    KERNEL_CALLS.append(list(counts))

    def at(bias, e):
        return None if bias is None else bias[e]

    outs = []
    for e, part in enumerate(rows.split(counts)):
        gate = F.linear(part, w.w_gate[e], at(w.b_gate, e))
        hidden = F.silu(gate) * F.linear(part, w.w_up[e], at(w.b_up, e))
        outs.append(F.linear(hidden, w.w_down[e], at(w.b_down, e)))
    return torch.cat(outs)


def only_silu(spec: MoESpec) -> list[str]:
    return [] if spec.activation == "silu" else [f"the toy loop has no {spec.activation}"]


def write_toy(program, directory, target: Target) -> dict[str, str]:
    torch.export.save(program.program, directory / target.files["model"])
    return {"model": target.files["model"]}


class ToyRunner(Runner):
    """Runs the saved program as it is (no packing, no pytree shortcuts)."""

    def activate_impl(self) -> None:
        path = self.directory / self.manifest.files["model"].path
        self.module = torch.export.load(path).module()

    def infer_impl(self, feeds):
        with torch.no_grad():
            outs = self.module(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        names = [o.name for o in self.manifest.outputs]
        return {n: o.numpy() for n, o in zip(names, outs, strict=True)}

    def deactivate_impl(self) -> None:
        self.module = None


TOY_LOWERING = Lowering(
    "toy-loop", ("toy",), "a Python loop over experts", check=only_silu, kernel=loop_experts
)
TOY_TARGET = Target(
    "toy",
    "the program as saved, run by ToyRunner",
    {"model": "toy.pt2"},
    (Prefer("toy-loop", why="the toy rule"),),
    write=write_toy,
    runner=ToyRunner,
)


@pytest.fixture
def toy():
    with registry.registered(TOY_LOWERING, TOY_TARGET):
        yield
    assert "toy" not in registry.target_names()


def test_a_toy_target_and_lowering_compile_load_and_verify(tmp_path, toy):
    KERNEL_CALLS.clear()
    result = moec.compile("zoo:mixtral-lm", target="toy", output=tmp_path / "out")
    assert [b.lowering for b in result.blocks] == ["toy-loop", "toy-loop"]
    assert all(b.reason == "the toy rule" for b in result.blocks)
    assert [f.path for f in result.manifest.files.values()] == ["toy.pt2"]
    ids = np.random.default_rng(0).integers(0, 256, (2, 7))
    with torch.no_grad():
        ref = build_zoo("mixtral-lm").model(torch.from_numpy(ids)).numpy()
    KERNEL_CALLS.clear()
    with moec.load(result.path) as runner:
        assert isinstance(runner, ToyRunner)
        out = runner(ids)
    assert len(KERNEL_CALLS) == 2  # the toy kernel ran each block
    assert np.abs(out - ref).max() < 1e-5
    assert moec.verify(result.path)


def test_the_cli_offers_and_compiles_a_registered_target(tmp_path, toy):
    help_text = CliRunner().invoke(main, ["compile", "--help"]).output
    assert "ort|onnx|trt|torch|toy" in help_text and "toy-loop" in help_text
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", "zoo:mixtral", "-t", "toy", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["target"] == "toy"
    refused = CliRunner().invoke(
        main, ["compile", "zoo:mixtral", "-t", "toy", "--lowering", "gather", "-o", str(out)]
    )
    assert refused.exit_code == 2 and "it can run: toy-loop" in refused.output


def test_a_lowering_registered_for_a_target_is_checked_and_used(tmp_path, toy):
    block = build_zoo("qwen-moe")  # gated silu with a shared expert: the toy loop fits it
    result = moec.compile(block.model, block.example_inputs, target="toy", output=tmp_path / "a")
    assert [b.lowering for b in result.blocks] == ["toy-loop"]
    gelu = build_zoo("expert-choice")  # plain gelu experts: the toy loop's check refuses them
    with pytest.raises(LoweringError, match=r"MoE block \(model\) .*the toy loop has no gelu"):
        moec.compile(gelu.model, gelu.example_inputs, target="toy", output=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_an_artifact_of_an_unregistered_target_is_refused(tmp_path, toy):
    path = moec.compile("zoo:mixtral", target="toy", output=tmp_path / "a").path
    registry.unregister(TOY_TARGET)
    with pytest.raises(ArtifactError, match=r"'target' must be one of \('ort', 'onnx'"):
        moec.load(path)


def test_registrations_are_checked():
    with pytest.raises(MoecError, match="already registered"):
        registry.register_target(registry.target("ort"))
    with pytest.raises(MoecError, match="one emitter"):
        registry.register_lowering(Lowering("none", ("ort",), "no emitter"))
    with pytest.raises(MoecError, match="built in"):
        registry.unregister(registry.lowering("gather"))
    unknown_rule = Target("t2", "", {"model": "m"}, (Prefer("kernel"),))
    with pytest.raises(MoecError, match="names lowering 'kernel', not registered for it"):
        registry.register_target(unknown_rule)
    bounded = Target("toy", "", {"model": "m"}, (Prefer("toy-loop", 8),))
    with (
        pytest.raises(MoecError, match="last step of its default rule needs no bound"),
        registry.registered(TOY_LOWERING, bounded),
    ):
        pass
    assert "toy-loop" not in registry.lowering_names()  # the failed block undid what it did
    with pytest.raises(MoecError, match="cannot be imported"):
        registry.resolve("moec.nowhere:thing")
    with pytest.raises(LoweringError, match="unknown lowering 'nope'"):
        registry.lowering("nope")
    unbuilt = Target("later", "", {"model": "m"}, (Prefer("gather"),), unavailable="not built")
    with pytest.raises(TargetNotBuiltError, match="not built"):
        unbuilt.writer()
