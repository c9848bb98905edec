"""Transformers models without a head (``…TextModel``) compile to ``last_hidden_state`` and
verify on it; they generate nothing, so they get no KV cache."""

from __future__ import annotations

import pytest
import torch
from hf_families import build_tiny, save_tiny

import moec
from moec.models.hf_models import BaseModelHidden, CausalLMLogits, hf_model_source


@pytest.mark.parametrize(
    ("family", "wrapper", "output"),
    [
        ("diffusion_gemma", BaseModelHidden, "last_hidden_state"),
        ("deepseek_ocr2", BaseModelHidden, "last_hidden_state"),
        ("mixtral", CausalLMLogits, "logits"),
        ("openai_privacy_filter", CausalLMLogits, "logits"),
    ],
)
def test_the_output_follows_the_class_the_model_returns(family, wrapper, output):
    source = hf_model_source(build_tiny(family))
    assert type(source.model) is wrapper
    assert source.output_names == [output]
    with torch.no_grad():
        out = source.model(*source.example_inputs)
    assert out.shape[:2] == source.example_inputs[0].shape


def test_a_base_model_compiles_to_its_last_hidden_state(tmp_path):
    directory = save_tiny("deepseek_ocr2", tmp_path / "model")
    result = moec.compile(f"hf:{directory}", target="ort", output=tmp_path / "out")
    assert [o.name for o in result.manifest.main_outputs] == ["last_hidden_state"]
    assert not result.manifest.decoding
    assert len(result.blocks) == 2
    report = moec.verify(result.path)
    assert report, report.to_dict()
    assert [o.name for o in report.outputs] == ["last_hidden_state"]
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = build_tiny("deepseek_ocr2")(ids, attention_mask=torch.ones_like(ids))
    with moec.load(result.path) as runner:
        got = runner(ids, torch.ones_like(ids))
    assert got.shape == (2, 7, 64)
    assert torch.allclose(got, expected.last_hidden_state, atol=1e-5)
