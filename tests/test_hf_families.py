"""Hugging Face MoE families: tiny random models built here, saved with save_pretrained,
compiled from hf:DIR for `ort` and `onnx`, and verified against eager transformers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from generation_checks import assert_same_as_transformers, left_padded_prompt
from hf_families import FAMILIES, REQUIRED, build_tiny, save_tiny

import moec
from moec.eager_routing import (
    PERTURBATION_SIGNS,
    eager_routing_hooks,
    mark_flips,
    perturbed_blocks,
)
from moec.errors import LoweringError, SourceError
from moec.models import find_moe_blocks


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = save_tiny(family, tmp_path_factory.mktemp(family) / "model")
        return cache[family]

    return get


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("family", REQUIRED)
def test_family_compiles_and_verifies(saved, tmp_path, family, target):
    result = moec.compile(f"hf:{saved(family)}", target=target, output=tmp_path / "out")
    assert len(result.blocks) >= 2, [b.name for b in result.blocks]  # both layers are MoE
    assert not any("looks like an MoE block" in n for n in result.notes), result.notes
    report = moec.verify(result.path)
    assert report, report.to_dict()
    shapes = [s["input_ids"] for s in report.shapes]
    assert len(shapes) >= 3 and [1, 1] in shapes
    assert report.outputs[0].name == "logits" and report.outputs[0].rel_l2 <= 1e-4
    assert len(report.routing) == len(result.blocks)
    assert all(r.agreement >= 0.999 for r in report.routing)
    if target == "onnx":
        assert {b.lowering for b in result.blocks} <= {"gather", "subgraph"}
    if family != "switch_transformers":  # an encoder-decoder: no cache yet
        assert result.manifest.decoding, result.notes
        assert len(report.decode) == 9 and all(step.passed for step in report.decode)
        with moec.load(result.path) as runner:
            assert_same_as_transformers(runner, build_tiny(family), *left_padded_prompt())


def test_in_memory_transformers_model(tmp_path):
    model = build_tiny("qwen3_moe")
    result = moec.compile(model, target="ort", output=tmp_path / "out")
    names = [i.name for i in result.manifest.inputs]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert {b.lowering for b in result.blocks} <= {"fused", "gather"}
    assert moec.verify(result.path, source=model)


def test_directory_without_config(tmp_path):
    with pytest.raises(SourceError, match=r"has no config\.json"):
        moec.compile(f"hf:{tmp_path}", output=tmp_path / "out")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_moe"}))
    with pytest.raises(SourceError, match="does not know model_type 'no_such_moe'"):
        moec.compile(f"hf:{tmp_path}", output=tmp_path / "out")


def test_weights_that_do_not_match_the_config(saved, tmp_path):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(saved("mixtral"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] *= 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="cannot load its weights"):
        moec.compile(f"hf:{directory}", output=tmp_path / "out")


def test_family_moec_cannot_convert_is_named(tmp_path):
    model = build_tiny("mixtral")
    for layer in model.model.layers:  # an activation moec has no name for
        layer.mlp.experts._apply_gate = lambda gate_up: torch.sin(gate_up).chunk(2, dim=-1)[0]
    with pytest.raises(LoweringError) as info:  # transformers' own experts op has no ONNX
        moec.compile(model, output=tmp_path / "out")
    message = str(info.value)
    assert "not converted, and likely the cause: MoE block" in message
    assert "model.model.layers.0.mlp.experts (MixtralExperts)" in message
    assert "matches none of moec's activations" in message
    assert not (tmp_path / "out").exists()


def test_torch_artifact_of_stacked_experts_saves_without_warnings(tmp_path):
    """transformers stacks gate and up as one gate_up_proj, which moec's op reads as two views:
    torch.export.save writes their storage once and warns that no view covers all of it, which
    says nothing about the user's model; moec keeps that warning to itself."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = moec.compile(build_tiny("mixtral"), target="torch", output=tmp_path / "out")
    assert result.blocks
    assert not [w for w in caught if "No complete tensor" in str(w.message)]


@pytest.mark.parametrize("target", ["ort", "torch"])
def test_undecorated_experts_module_verifies(tmp_path, target):
    """Step-3.7 writes its experts without @use_experts_implementation's flags, and caps the
    activation's output on its first layer (the fused ORT op cannot: that block is gathered)."""
    model = build_tiny("step3p7")
    result = moec.compile(model, target=target, output=tmp_path / "out")
    assert [b.class_name for b in result.blocks] == ["Step3p7Experts"] * 2
    assert ["silu<=7 " in b.summary for b in result.blocks] == [True, False]
    if target == "ort":
        assert result.blocks[0].lowering == "gather"
    assert moec.verify(result.path, source=model)


class TransposedExperts(torch.nn.Module):
    """Stacked like transformers' default layout, but its forward reads gate_up_proj as
    [E, H, 2I]: the shapes fit (H = 2I), the function is another."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 16, 16))
        self.down_proj = torch.nn.Parameter(torch.randn(4, 16, 8))

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for slot in range(top_k_index.shape[1]):
            for t, e in enumerate(top_k_index[:, slot].tolist()):
                h = self._apply_gate(hidden_states[t] @ self.gate_up_proj[e])
                out[t] += top_k_weights[t, slot] * (self.down_proj[e] @ h)
        return out


def test_undecorated_experts_module_that_is_not_what_it_looks_like_is_refused():
    block = torch.nn.Module()
    block.experts = TransposedExperts()
    refused: dict[str, str] = {}
    assert find_moe_blocks(block, refused) == []
    message = refused["experts"]
    assert "experts (TransposedExperts): its forward is not the experts" in message
    assert "register an adapter" in message


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_llama4_blocks_scale_their_experts_inputs(saved, tmp_path, target):
    """Llama 4 multiplies each expert's input by its sigmoid router score: one moec::moe node
    with gate_on_input per block, gathered (com.microsoft.MoE scales outputs), verified."""
    result = moec.compile(f"hf:{saved('llama4')}", target=target, output=tmp_path / "out")
    assert [b.adapter for b in result.blocks] == ["input-gated"] * 2
    assert all("gating the input" in b.summary for b in result.blocks)
    assert {b.lowering for b in result.blocks} == {"gather"}
    if target == "ort":
        assert all("gate_on_input" in b.reason for b in result.blocks)
    report = moec.verify(result.path)
    assert report, report.to_dict()
    assert all(o.rel_l2 <= 1e-4 for o in report.outputs)
    assert all(r.agreement >= 0.999 for r in report.routing)
    assert len(report.decode) == 9 and all(step.passed for step in report.decode)


def test_input_gated_block_that_scales_outputs_is_refused():
    """Shaped like Llama 4's block, but its router scores scale the experts' outputs."""
    block = build_tiny("llama4").model.layers[0].feed_forward

    def forward(hidden_states):
        x = hidden_states.reshape(-1, block.hidden_dim)
        scores, logits = block.router(x)
        routed = block.experts(x.repeat(scores.shape[1], 1))
        routed = routed * scores.transpose(0, 1).reshape(-1, 1)
        out = block.shared_expert(x) + routed.reshape(scores.shape[1], -1, x.shape[-1]).sum(0)
        return out, logits

    block.forward = forward
    refused: dict[str, str] = {}
    assert find_moe_blocks(block, refused) == []
    assert "scaling the inputs of the experts" in refused[""]


def test_experts_subclass_with_a_forward_of_its_own_is_checked():
    """Ergo's experts subclass a decorated class and wrap its forward in a norm per expert:
    read as a post-expert norm, which its own forward confirms. A subclass whose forward adds
    something else is refused, not compiled without it; one that adds nothing converts."""
    blocks = find_moe_blocks(build_tiny("ergo"))
    assert [type(b.module).__name__ for b in blocks] == ["ErgoExperts", "ErgoExperts"]
    assert {b.spec.post_expert_norm_eps for b in blocks} == {1e-12}
    assert blocks[0].weights.post_norm_weight.shape == (8, 64)

    model = build_tiny("mixtral")
    experts = model.model.layers[0].mlp.experts

    class PassThroughExperts(type(experts)):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return super().forward(hidden_states, top_k_index, top_k_weights)

    class DoubledExperts(type(experts)):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    experts.__class__ = PassThroughExperts
    blocks = find_moe_blocks(model)
    assert [type(b.module).__name__ for b in blocks] == ["PassThroughExperts", "MixtralExperts"]
    experts.__class__ = DoubledExperts
    refused: dict[str, str] = {}
    assert len(find_moe_blocks(model, refused)) == 1
    assert "its forward is not the experts" in refused["model.layers.0.mlp.experts"]


def test_a_zero_input_routes_on_exact_ties_and_counts_as_one():
    """Cohere2-MoE's pad token embeds to zero, so a one-token call of it hands every block a
    zero input: all router logits tie exactly, and PyTorch and ONNX Runtime pick different
    (equally right) experts. The perturbation that finds near-ties must mark it too."""
    model = build_tiny("cohere2_moe")
    blocks = {m.name: m for m in find_moe_blocks(model)}
    routing, perturbed = {}, {}
    ids = torch.tensor([[model.config.pad_token_id]])
    with eager_routing_hooks(blocks, routing), torch.no_grad():
        model(ids)
    hooks = eager_routing_hooks(blocks, perturbed)
    with perturbed_blocks(model, blocks), hooks, torch.no_grad():
        model(ids)
    mark_flips(routing, [perturbed])
    assert [float(margin.max()) for _, margin in routing.values()] == [0.0, 0.0]


def test_an_exact_tie_flips_under_one_of_the_opposite_perturbations():
    """A zero block input ties every expert; one noise draw may pick the reference's experts
    again (GraniteMoeHybrid's second config did), its negation then picks the others."""
    model = build_tiny("granitemoehybrid")
    blocks = {m.name: m for m in find_moe_blocks(model)}
    zeroed = [  # registered before the perturbation's hooks, which add their noise after
        model.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(
            lambda module, args: (torch.zeros_like(args[0]), *args[1:])
        )
        for name in blocks
    ]
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    routing, perturbed = {}, [{} for _ in PERTURBATION_SIGNS]
    with eager_routing_hooks(blocks, routing), torch.no_grad():
        model(ids)
    for sign, run in zip(PERTURBATION_SIGNS, perturbed, strict=True):
        hooks = eager_routing_hooks(blocks, run)
        with perturbed_blocks(model, blocks, sign), hooks, torch.no_grad():
            model(ids)
    for handle in zeroed:
        handle.remove()
    mark_flips(routing, perturbed)
    assert all((margin == 0.0).all() for _, margin in routing.values())


def test_exact_routing_ties_do_not_fail_verify(tmp_path):
    """Seed 27 draws the pad token as the one-token input, and pad tokens in the decode prompt:
    the artifact's logits match, and so must verify's verdict."""
    model = build_tiny("cohere2_moe")
    result = moec.compile(model, target="ort", output=tmp_path / "out")
    report = moec.verify(result.path, source=model, seed=27)
    assert report, report.to_dict()
    # the ties are seen (a zero margin); ONNX's tie order in the reference picks as ORT does
    assert sum(r.near_ties for r in report.routing) >= 2


def test_model_that_is_not_moe(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "dense")
    result = moec.compile(f"hf:{tmp_path / 'dense'}", target="onnx", output=tmp_path / "out")
    assert result.blocks == [] and "no MoE block found" in result.notes[0]
    assert moec.verify(result.path)


def test_catalog_covers_the_required_families():
    assert set(REQUIRED) <= set(FAMILIES)


@pytest.mark.parametrize(
    ("family", "passes"),
    [
        ("mixtral", dict(merge_experts=0.5, merge_method="hc", merge_lstsq=True)),
        ("qwen2_moe", dict(prune_experts=0.5, prune_method="reconstruction")),
        ("deepseek_v3", dict(merge_experts=0.5, merge_method="router-logits")),
        ("qwen3_moe", dict(distill_dense=True, distill_steps=3)),
    ],
    ids=["mixtral-merge", "qwen2-prune", "deepseek-v3-merge", "qwen3-distill"],
)
def test_compressed_family_verifies_against_its_passes(saved, tmp_path, family, passes):
    """Behind the family's own router: merged experts by expert_map, pruned ones unmapped,
    distilled experts modules as dense FFNs that ignore the routing they are handed."""
    calib = tmp_path / "calib.npy"
    vocab = FAMILIES[family]["kwargs"].get("vocab_size", 128)
    np.save(calib, np.random.default_rng(0).integers(0, vocab, (12, 16)))
    result = moec.compile(
        f"hf:{saved(family)}",
        target="ort",
        output=tmp_path / "out",
        calib=calib,
        **passes,
    )
    quality = result.manifest.compression["quality"]
    assert quality["moe_parameters"]["reduction"] > 0.3
    assert "perplexity" in quality
    report = moec.verify(result.path)
    assert report, report.to_dict()
