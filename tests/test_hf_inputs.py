"""Transformers models in and out: `moec.compile(model, (ids, mask))`; left-padded batches and
no mask at all, as transformers takes them; `verify` checks a padded batch on the tokens it
attends."""

from __future__ import annotations

import pytest
import torch
from hf_families import build_tiny, save_tiny

import moec
from moec.errors import MoecError


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_a_graph_without_cache_runs_padded_batches_and_no_mask(tmp_path, family):
    directory = save_tiny(family, tmp_path / "model")
    art = moec.compile(f"hf:{directory}", target="ort", output=tmp_path / "out",
                       no_kv_cache=True).path  # fmt: skip
    report = moec.verify(art)
    assert report, report.to_dict()
    assert any("left-padded" in note for note in report.notes)
    assert report.shapes[-1]["attention_mask"] == [2, 8]
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        expected = build_tiny(family)(ids, attention_mask=mask).logits
    with moec.load(art) as runner:
        padded = runner(ids, mask)
        attended = mask.bool()  # a padded token's logits are not defined by the model
        assert torch.allclose(padded[attended], expected[attended], atol=1e-5)
        assert torch.equal(runner(ids), runner(ids, torch.ones_like(ids)))


def test_compile_takes_a_transformers_model_with_its_example_inputs(tmp_path):
    model = build_tiny("mixtral")
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    art = moec.compile(model, (ids, mask), target="ort", output=tmp_path / "out").path
    with moec.load(art) as runner, torch.no_grad():
        assert torch.allclose(runner(ids, mask), model(ids, attention_mask=mask).logits, atol=1e-5)
    assert moec.verify(art, source=model)
    with pytest.raises(MoecError, match=r"example attention_mask .* differs from input_ids"):
        moec.compile(model, (ids, mask[:, :2]), output=tmp_path / "bad")
    with pytest.raises(MoecError, match="example input_ids of MixtralForCausalLM must be an int"):
        moec.compile(model, (ids.float(),), output=tmp_path / "bad")


def test_a_bf16_checkpoint_says_it_is_built_in_float32(tmp_path, caplog):
    build_tiny("mixtral").to(torch.bfloat16).save_pretrained(tmp_path / "model")
    with caplog.at_level("WARNING"):
        moec.compile(f"hf:{tmp_path / 'model'}", target="torch", output=tmp_path / "out")
    assert "stores its weights in bfloat16; moec builds the model in float32" in caplog.text
