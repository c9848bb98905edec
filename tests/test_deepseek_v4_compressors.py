"""DeepSeek-V4's compressors and indexer, rewritten for export without branches on the number
of windows, give eager's compressed entries and block bias for every short length (plus their
padded entries, hidden from every query), in both tiny configs; the compiled artifact takes
every length, one token included, and verifies."""

from __future__ import annotations

import pytest
import torch
from hf_families import build_tiny, save_tiny

import moec
from moec.models.hf_patches import METHODS

LENGTHS = range(1, 41)


def _rewritten(module):
    """The module's forward as the export rewrite computes it."""
    return METHODS[type(module).__name__][1](type(module).forward)


@pytest.mark.parametrize("second", [False, True])
def test_rewrites_give_eager_entries_for_every_length(monkeypatch, second):
    model = build_tiny("deepseek_v4", second=second)
    compressors = [layer.self_attn.compressor for layer in model.model.layers]
    assert {type(c).__name__ for c in compressors} == {
        "DeepseekV4CSACompressor",
        "DeepseekV4HCACompressor",
    }
    for length in LENGTHS:
        g = torch.Generator().manual_seed(length)
        hidden = torch.randn(2, length, model.config.hidden_size, generator=g)
        q_residual = torch.randn(2, length, model.config.q_lora_rank, generator=g)
        positions = torch.arange(length).unsqueeze(0)
        for compressor in compressors:
            args = (hidden, q_residual, positions, None, 0)
            with torch.no_grad():
                entries, bias = compressor(*args)
                with monkeypatch.context() as patch:
                    indexer = getattr(compressor, "indexer", None)
                    if indexer is not None:
                        patch.setattr(type(indexer), "forward", _rewritten(indexer))
                    ours, our_bias = _rewritten(compressor)(compressor, *args)
            complete = entries.shape[2]
            assert complete == length // compressor.compress_rate
            assert ours.shape[2] == complete + 2
            assert torch.equal(ours[:, :, :complete], entries), (length, compressor)
            if bias is not None:
                assert torch.equal(our_bias[..., :complete], bias.expand(2, -1, -1, -1))
            assert bool((our_bias[..., complete:] == float("-inf")).all()), (length, compressor)


def test_artifact_takes_one_token_and_short_prompts(tmp_path):
    # the torch target: the same capture as ONNX's (where the lengths were fixed), compiled faster
    directory = save_tiny("deepseek_v4", tmp_path / "model")
    result = moec.compile(f"hf:{directory}", target="torch", output=tmp_path / "out")
    ids = next(spec for spec in result.manifest.inputs if spec.name == "input_ids")
    assert ids.shape[1].min == 1, result.notes
    report = moec.verify(result.path, schedule=((1, 1), (2, 3), (1, 7)))
    assert report, report.to_dict()
    shapes = [shape["input_ids"] for shape in report.shapes]
    assert [1, 1] in shapes and [1, 7] in shapes
    assert max(report.outputs[0].per_run) <= 1e-5
