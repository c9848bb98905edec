"""Causal LMs compile with a KV cache: `generate` equals transformers' greedy `generate`, the
cache inputs are checked, and a runner called without them runs an empty past."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from generation_checks import assert_same_as_transformers, left_padded_prompt
from hf_families import REQUIRED, build_tiny, save_char_tokenizer, save_tiny

import moec
from moec.cli import main
from moec.errors import InputError, UsageError
from moec.models.zoo import build_zoo
from moec.runtime.ort_decode_steps import BoundDecodeSteps
from moec.runtime.torch_decode_steps import TorchDecodeSteps


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    directory = save_tiny("mixtral", tmp_path_factory.mktemp("mixtral") / "model")
    out = tmp_path_factory.mktemp("art") / "out"
    return directory, moec.compile(f"hf:{directory}", target="torch", output=out).path


# the causal LMs of test_hf_families (which checks them on ort and onnx)
CAUSAL_FAMILIES = [f for f in REQUIRED if f != "switch_transformers"]


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_torch_artifact_generates_what_transformers_generates(tmp_path, family):
    directory = save_tiny(family, tmp_path / "model")
    result = moec.compile(f"hf:{directory}", target="torch", output=tmp_path / "out")
    names = [spec.name for spec in result.manifest.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.0.key" in names and result.manifest.decoding["layers"]
    with moec.load(result.path) as runner:
        assert runner.decode_steps(1, 4).in_place  # the cache appended to in its buffers
        assert_same_as_transformers(runner, build_tiny(family), *left_padded_prompt())


def test_a_runner_called_without_the_cache_runs_an_empty_past(tmp_path, mixtral):
    directory, art = mixtral
    plain = moec.compile(f"hf:{directory}", target="torch", output=tmp_path / "plain",
                         no_kv_cache=True).path  # fmt: skip
    ids, mask = left_padded_prompt()
    with moec.load(art) as runner, moec.load(plain) as reference:
        assert [s.name for s in reference.manifest.inputs] == ["input_ids", "attention_mask"]
        logits = runner(ids)
        assert torch.allclose(logits, reference(ids, torch.ones_like(ids)), atol=1e-6)
        outputs = runner.infer({"input_ids": ids.numpy()})
        assert outputs["present.0.key"].shape[2] == ids.shape[1]
        model = build_tiny("mixtral")
        with torch.no_grad():
            expected = model(ids, attention_mask=mask).logits
        rows = mask.bool()  # padded positions' logits are not defined by the model
        assert torch.allclose(runner(ids, mask)[rows], expected[rows], atol=1e-5)


def test_generate_streams_samples_reproducibly_and_stops_at_eos(mixtral):
    _, art = mixtral
    ids, mask = left_padded_prompt(1)
    with moec.load(art) as runner:
        seen: list[np.ndarray] = []
        greedy = runner.generate(ids.numpy(), 6, attention_mask=mask.numpy(), streamer=seen.append)
        assert isinstance(greedy, np.ndarray) and greedy.shape == (3, 13)
        assert np.array_equal(np.stack(seen, axis=1), greedy[:, 7:])
        one = runner.generate(ids, 6, attention_mask=mask, do_sample=True, top_k=1, seed=0)
        assert np.array_equal(one.numpy(), greedy)
        options = {"attention_mask": mask, "do_sample": True, "temperature": 1.5, "top_p": 0.9}
        draws = [runner.generate(ids, 6, seed=s, **options) for s in (7, 7, 8)]
        assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
        eos = int(greedy[0, 9])  # the third new token of the first row
        stopped = runner.generate(ids, 6, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
        assert stopped[0, 9] == eos and (stopped[0, 10:] == 0).all()


def test_bad_cache_inputs_are_refused_with_their_names(tmp_path, mixtral):
    directory, art = mixtral
    with moec.load(art) as runner:
        ids = np.ones((1, 2), dtype=np.int64)
        feeds = runner.decoding.complete({"input_ids": ids}, runner.manifest.inputs)
        past = {name: np.zeros((1, 2, 3, 16), np.float32) for name in runner.decoding.past_names}
        with pytest.raises(InputError, match=r"attention_mask.*past_sequence_length 3 \+ "):
            runner.infer({**feeds, **past})  # a mask over the new tokens only
        wrong = {**feeds, **past, "attention_mask": np.ones((1, 5), np.int64)}
        wrong["past_key_values.0.key"] = np.zeros((1, 3, 3, 16), np.float32)
        with pytest.raises(InputError, match=r"past_key_values\.0\.key"):
            runner.infer(wrong)
        with pytest.raises(InputError, match="without 'attention_mask'"):
            runner.infer({"input_ids": ids, **past})
        with pytest.raises(InputError, match="more than the model's 64 positions"):
            runner.generate(ids, max_new_tokens=63)
        with pytest.raises(InputError, match="prompt is empty"):
            runner.generate(np.zeros((1, 0), np.int64))
    plain = moec.compile(f"hf:{directory}", target="torch", output=tmp_path / "plain",
                         no_kv_cache=True).path  # fmt: skip
    with pytest.raises(UsageError, match="--no-kv-cache"):
        moec.load(plain).generate(ids)


def test_moec_generate_prints_the_continuation_and_tokens_per_second(tmp_path):
    directory = save_char_tokenizer(save_tiny("qwen2_moe", tmp_path / "model"))
    art = moec.compile(f"hf:{directory}", target="ort", output=tmp_path / "out").path
    assert (art / "tokenizer.json").is_file()
    done = CliRunner().invoke(
        main, ["generate", str(art), "--prompt", "def f(x):", "--max-new-tokens", "12"]
    )
    assert done.exit_code == 0, done.output
    text, speed = done.output.strip().splitlines()[-2:]
    ids = np.array([[ord(c) for c in "def f(x):"]])
    with moec.load(art) as runner:
        tokens = runner.generate(ids, 12)[0, ids.shape[1] :]
    expected = "".join(chr(t) for t in tokens if 32 <= t < 127)  # 0-31, 127: not in the vocab
    assert text == "def f(x):" + expected and speed.startswith("12 tokens in ")
    batch = CliRunner().invoke(main, ["generate", str(art), "--prompt", "ab", "--prompt", "abcd",
                                      "--max-new-tokens", "4"])  # fmt: skip
    assert batch.exit_code == 0 and "8 tokens in" in batch.output, batch.output
    empty = CliRunner().invoke(main, ["generate", str(art), "--prompt", ""])
    assert empty.exit_code == 2 and "tokenises to nothing" in empty.output, empty.output
    bare = moec.compile(f"hf:{save_tiny('qwen2_moe', tmp_path / 'bare')}", target="ort",
                        output=tmp_path / "bare-out").path  # fmt: skip
    untokenised = CliRunner().invoke(main, ["generate", str(bare), "--prompt", "x"])
    assert untokenised.exit_code == 2 and "carries no tokenizer" in untokenised.output


@pytest.mark.parametrize("target", ["ort", "onnx", "torch"])
def test_zoo_lm_generates_what_recomputing_every_token_gives(tmp_path, target):
    result = moec.compile("zoo:deepseek-lm", target=target, output=tmp_path / "out")
    report = moec.verify(result.path)
    assert report and len(report.decode) == 9, report.to_dict()["decode"]
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with moec.load(result.path) as runner:
        tokens = runner.generate(ids, 16)
    model, expected = build_zoo("deepseek-lm").model, ids
    with torch.no_grad():
        for _ in range(16):
            expected = torch.cat([expected, model(expected)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(tokens, expected)


def test_a_zoo_lm_module_compiled_without_input_ranges_gets_its_vocabulary(tmp_path):
    model = build_zoo("mixtral-lm").model
    ids = torch.zeros(1, 16, dtype=torch.long)
    result = moec.compile(model, (ids,), target="ort", output=tmp_path / "a")
    assert result.manifest.decoding  # the cache was captured
    spec = next(s for s in result.manifest.inputs if s.name == "input_ids")
    assert tuple(spec.value_range) == (0, model.embed.num_embeddings)


@pytest.mark.parametrize("target", ["ort", "torch"])
def test_decode_steps_keep_the_cache_in_buffers_allocated_once(tmp_path, target):
    art = moec.compile("zoo:deepseek-lm", target=target, output=tmp_path / "out").path
    ids = np.random.default_rng(0).integers(0, 256, (2, 5))
    with moec.load(art) as runner:
        decoding, steps = runner.decoding, runner.decode_steps(2, 9)
        assert isinstance(steps, (BoundDecodeSteps, TorchDecodeSteps))
        assert target == "ort" or steps.in_place
        feeds = decoding.complete({"input_ids": ids}, runner.manifest.inputs)
        for step in range(4):
            expected = runner.infer(dict(feeds))
            outputs = steps(feeds)
            for past, name in zip(decoding.past_names, decoding.present_names, strict=True):
                # ort: two buffers per present to alternate; torch: one per past, grown in place
                buffer = (
                    steps.buffers[name][0][step % 2] if target == "ort" else steps.buffers[past]
                )
                assert np.shares_memory(np.asarray(outputs[name]), np.asarray(buffer))
                np.testing.assert_allclose(outputs[name], expected[name], atol=1e-6)
            np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=1e-5)
            token = outputs["logits"][:, -1:].argmax(-1)
            length = ids.shape[1] + step + 1
            feeds = decoding.next_step(token, np.ones((2, length), np.int64),
                                       np.full((2, 1), length - 1), outputs)  # fmt: skip


@pytest.mark.parametrize(("name", "how"), [("expert-choice-lm", "by expert choice"),
                                           ("switch-lm", "with expert capacity")])  # fmt: skip
def test_routing_that_looks_ahead_compiles_without_a_cache(tmp_path, name, how):
    result = moec.compile(f"zoo:{name}", target="torch", output=tmp_path / "out")
    assert not result.manifest.decoding
    assert any(how in note and "without a KV cache" in note for note in result.notes)
    with pytest.raises(UsageError, match="no KV cache"):
        moec.load(result.path).generate(np.ones((1, 3), np.int64))
