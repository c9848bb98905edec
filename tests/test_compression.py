"""Lossy passes: expert merging and pruning on tiny models, their quality report, and their
artifacts verified against the passes' own output."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import moec
from moec.cli import main
from moec.compiler.moe_block import MoEBlock
from moec.errors import ArtifactError, MoecError
from moec.ir import MoESpec, MoEWeights
from moec.models import ModelSource
from moec.models.dense_ffn import DenseFFN
from moec.passes import DistillDensePass, MergeExpertsPass, PruneExpertsPass
from moec.passes.calibration import CalibrationData, load_calibration
from moec.passes.compression_state import CompressionState
from moec.passes.distill_dense import warmup_cosine
from moec.passes.expert_load import expert_load
from moec.settings import DISTILL_INITS, MERGE_METHODS, PRUNE_METHODS

H, FFN = 16, 24


def block_with(weights_of, num_experts=8, top_k=2, router_bias=None, seed=0, **spec_kw):
    """An MoEBlock whose expert e has the weights ``weights_of(e)`` (a [3] tuple of tensors)."""
    g = torch.Generator().manual_seed(seed)
    spec = MoESpec(num_experts, top_k, H, FFN, norm_topk_prob=True, **spec_kw)
    gate, up, down = (
        torch.stack(t) for t in zip(*(weights_of(e) for e in range(num_experts)), strict=True)
    )
    weights = MoEWeights(
        router_weight=torch.randn(num_experts, H, generator=g),
        router_bias=router_bias,
        w_gate=gate,
        w_up=up,
        w_down=down,
    )
    return MoEBlock(spec, weights)


def random_expert(seed: int, noise: float = 0.0, base: int | None = None):
    g = torch.Generator().manual_seed(seed if base is None else base)
    w = (torch.randn(FFN, H, generator=g) / 4, torch.randn(FFN, H, generator=g) / 4)
    w = (*w, torch.randn(H, FFN, generator=g) / 5)
    if noise:
        g2 = torch.Generator().manual_seed(1000 + seed)
        w = tuple(t + noise * torch.randn(t.shape, generator=g2) for t in w)
    return w


def state_for(block: MoEBlock, rows: int = 40, seq: int = 16) -> CompressionState:
    x = torch.randn(rows, seq, H, generator=torch.Generator().manual_seed(7)).numpy()
    source = ModelSource(block, (torch.from_numpy(x[:2]),), input_names=["x"])
    return CompressionState(source, CalibrationData(x[:-4], x[-4:], "test"))


def run_pass(state: CompressionState, p) -> dict:
    result = p(state)
    return result.report


def outputs(module, x):
    with torch.no_grad():
        return module(x)


def routing(block: MoEBlock, x) -> torch.Tensor:
    """The chosen-experts mask [..., E] of ``block`` on ``x``."""
    block.routing_sink = []
    try:
        outputs(block, x)
        return block.routing_sink[0]
    finally:
        block.routing_sink = None


def test_merging_exact_copies_changes_nothing():
    block = block_with(lambda e: random_expert(e // 2))  # experts 2i and 2i+1 are copies
    state = state_for(block)
    report = run_pass(state, MergeExpertsPass(0.5, "hc"))
    merged = state.model
    assert merged.spec.num_experts == 4 and merged.spec.router_experts == 8
    assert sorted(map(sorted, report["blocks"][0]["clusters"])) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    x = torch.randn(3, 11, H)
    assert (outputs(merged, x) - outputs(block, x)).abs().max() <= 1e-6


def test_planted_clusters_are_recovered():
    planted = [e % 4 for e in range(12)]  # 4 clusters of 3 near-copies each
    block = block_with(lambda e: random_expert(e, noise=0.01, base=planted[e]), num_experts=12)
    state = state_for(block)
    report = run_pass(state, MergeExpertsPass(4, "hc"))
    found = sorted(map(sorted, report["blocks"][0]["clusters"]))
    assert found == [[c, c + 4, c + 8] for c in range(4)]


def test_router_remap_sends_tokens_to_their_merged_expert():
    block = block_with(lambda e: random_expert(e), num_experts=8)
    state = state_for(block)
    run_pass(state, MergeExpertsPass(3, "random"))
    merged = state.model
    x = torch.randn(2, 9, H)
    _, chosen_before = torch.ops.moec.moe(x, None, None, *_args(block), block.spec_json)
    _, chosen_after = torch.ops.moec.moe(x, None, None, *_args(merged), merged.spec_json)
    mapping = torch.tensor(merged.spec.expert_map)
    expected = torch.zeros_like(chosen_after)
    b, s, r = chosen_before.nonzero().unbind(1)
    expected[b, s, mapping[r]] = True
    assert torch.equal(chosen_after, expected)


@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_pruning_never_used_experts_is_lossless(method):
    bias = torch.zeros(8)
    bias[[1, 4, 6]] = -1e4  # never chosen
    block = block_with(lambda e: random_expert(e), router_bias=bias)
    state = state_for(block)
    report = run_pass(state, PruneExpertsPass(5, method))
    assert report["blocks"][0]["dropped"] == [1, 4, 6]
    assert state.model.spec.num_experts == 5
    x = torch.randn(3, 11, H, generator=torch.Generator().manual_seed(3))
    kept = [0, 2, 3, 5, 7]
    assert torch.equal(routing(state.model, x), routing(block, x)[..., kept])
    # the router's matmul over 5 rows instead of 8 rounds differently: equal up to float32
    # rounding at the output's scale
    reference = outputs(block, x)
    assert (outputs(state.model, x) - reference).abs().max() <= 1e-6 * reference.abs().max()


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_every_merge_method_merges(method):
    block = block_with(lambda e: random_expert(e))
    state = state_for(block)
    report = run_pass(state, MergeExpertsPass(0.75, method))
    assert state.model.spec.num_experts == 6
    assert sum(len(c) - 1 for c in report["blocks"][0]["clusters"]) == 2  # 8 -> 6


def test_least_squares_correction_reduces_the_error():
    block = block_with(lambda e: random_expert(e))
    errors = {}
    for correct in (False, True):
        state = state_for(block)
        run_pass(state, MergeExpertsPass(4, "hc", correct=correct))
        x = torch.from_numpy(state.calibration.fit[:8])
        errors[correct] = float((outputs(state.model, x) - outputs(block, x)).norm())
    assert errors[True] < errors[False]


@pytest.fixture(scope="module")
def lm_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (24, 32)))
    return path


@pytest.mark.parametrize("target", ["ort", "onnx", "torch"])
def test_compressed_lm_verifies_against_its_passes(tmp_path, lm_calibration, target):
    passes = dict(merge_experts=0.5, prune_experts=3, prune_method="reap")
    result = moec.compile(
        "zoo:mixtral-lm", target=target, output=tmp_path / "a", calib=lm_calibration, **passes
    )
    section = result.manifest.compression
    quality = section["quality"]
    assert quality["perplexity"]["before"] > 1 and quality["perplexity"]["after"] > 1
    assert 0 <= quality["top1_agreement"] <= 1
    assert quality["moe_parameters"]["reduction"] > 0.5
    assert [p["name"] for p in result.manifest.passes if p["lossy"]] == [
        "merge-experts",
        "prune-experts",
    ]
    assert all(b["spec"]["num_experts"] == 3 for b in section["blocks"])
    report = moec.verify(result.path)
    assert report, report.to_dict()
    assert all(o.rel_l2 <= 1e-5 for o in report.outputs)
    deployable = result.manifest.deployable_bytes  # verify's reference is not needed to run
    assert deployable + result.manifest.files["compressed"].bytes == result.size_bytes
    (result.path / "compressed.safetensors").unlink()
    with moec.load(result.path) as runner:
        runner(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ArtifactError, match="runs without it, but verify needs it"):
        moec.verify(result.path)


def test_text_calibration_uses_the_models_tokenizer(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    source = moec.models.build_zoo("mixtral-lm")
    data = load_calibration(text, source)
    assert data.fit.shape[1] == 64  # the zoo LM's longest sequence
    assert data.fit[0, :3].tolist() == list(b"The")


def test_cli_compile_prints_quality_and_verify_prints_it_again(tmp_path, lm_calibration):
    runner = CliRunner()
    out = tmp_path / "a"
    result = runner.invoke(
        main,
        [
            "compile",
            "zoo:qwen-moe-lm",
            "-o",
            str(out),
            "--calib",
            str(lm_calibration),
            "--merge-experts",
            "0.5",
            "--merge-method",
            "router-logits",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "quality after the lossy passes" in result.output and "perplexity" in result.output
    result = runner.invoke(main, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert "stored quality report" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["compressed"]["path"] == "compressed.safetensors"


def test_the_cli_builds_its_options_without_importing_torch():
    """The choices and defaults live in moec.settings and moec.registry, so `moec --help`
    stays fast."""
    code = "import sys, moec.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--merge-experts", "1.5"], "a fraction must be in (0, 1]"),
        (["--merge-experts", "0"], "a count must be between 1 and"),
        (["--prune-experts", "99"], "a count must be between 1 and"),
        (["--prune-experts", "1"], "fewer than the 2 each token chooses"),
        (["--merge-experts", "half"], "neither a fraction"),
        ([], "need calibration data"),
    ],
)
def test_bad_keep_or_missing_calibration(tmp_path, lm_calibration, args, message):
    calib = ["--calib", str(lm_calibration)] if args else []
    args = args or ["--merge-experts", "0.5"]
    result = CliRunner().invoke(
        main, ["compile", "zoo:mixtral-lm", "-o", str(tmp_path / "a"), *calib, *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "a").exists()


def test_bad_calibration_data_is_named(tmp_path):
    source = moec.models.build_zoo("mixtral-lm")
    cases = {
        "vocab.npy": (np.full((4, 8), 300), "outside the model's vocabulary"),
        "rank.npy": (np.zeros((4, 8, 2), dtype=np.int64), "expected 2-D"),
        "float.npy": (np.zeros((4, 8)), "takes token ids"),
        "long.npy": (np.zeros((4, 100), dtype=np.int64), "at most 64"),
        "one.npy": (np.zeros((1, 8), dtype=np.int64), "need >= 2"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        with pytest.raises(MoecError, match=message):
            load_calibration(tmp_path / name, source)
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    with pytest.raises(MoecError, match=r"not a readable \.npy"):
        load_calibration(tmp_path / "garbage.npy", source)
    block_source = moec.models.build_zoo("mixtral")
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(MoecError, match="needs the model's tokenizer"):
        load_calibration(tmp_path / "t.txt", block_source)


def test_a_block_with_one_expert_cannot_be_merged():
    block = block_with(lambda e: random_expert(e), num_experts=1, top_k=1)
    with pytest.raises(MoecError, match="one expert has nothing to merge"):
        run_pass(state_for(block), MergeExpertsPass(1, "hc"))


def _args(block: MoEBlock):
    return block.to_moe()[1].args()


def test_inspect_shows_expert_load_and_plots_it(tmp_path, lm_calibration):
    plot = tmp_path / "load.png"
    args = ["inspect", "zoo:mixtral-lm", "--calib", str(lm_calibration), "--plot", str(plot)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "expert load on" in result.output and plot.stat().st_size > 1000
    source = moec.models.build_zoo("mixtral-lm")
    loads = expert_load(source, load_calibration(lm_calibration, source))
    assert [load.block for load in loads] == ["layers.0.moe", "layers.1.moe"]
    for load in loads:  # every token picks 2 experts, with renormalised gates summing to 1
        assert load.tokens == 24 * 32
        assert abs(load.frequency.sum() - 2) < 1e-5 and abs(load.gate_mass.sum() - 1) < 1e-5


@pytest.mark.parametrize("init", DISTILL_INITS)
def test_distilling_a_layer_of_identical_experts_reproduces_it(init):
    block = block_with(lambda e: random_expert(0))  # eight copies; renormalised gates sum to 1
    state = state_for(block)
    report = run_pass(state, DistillDensePass(width=FFN, init=init))
    assert isinstance(state.model, DenseFFN) and state.model.spec.expert_size == FFN
    assert report["blocks"][0]["rel_error"]["least_squares"] < 1e-5
    x = torch.randn(3, 11, H)
    assert (outputs(state.model, x) - outputs(block, x)).abs().max() <= 1e-5


def test_distillation_steps_lower_the_error():
    block = block_with(lambda e: random_expert(e))
    state = state_for(block)
    report = run_pass(state, DistillDensePass(width=2 * FFN, steps=60, seed=3))
    errors = report["blocks"][0]["rel_error"]
    assert errors["least_squares"] < errors["init"]
    assert report["training"] == "end to end (all)"
    assert report["loss"]["last"] < report["loss"]["first"]
    assert report["train_tokens"] == 60 * (1024 // 16) * 16


def test_distillation_learning_rate_warms_up_then_decays_to_zero():
    weight = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.Adam([weight], lr=1.0)
    schedule = warmup_cosine(optimiser, 100)
    rates = []
    for _ in range(100):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.2) and max(rates) == rates[4] == pytest.approx(1.0, 1e-2)
    assert rates[-1] < 1e-3 and all(a >= b for a, b in itertools.pairwise(rates[4:]))


def test_distillation_with_hard_labels_trains_on_the_text(lm_calibration):
    source = moec.models.build_zoo("mixtral-lm")
    state = CompressionState(source, load_calibration(lm_calibration, source))
    report = run_pass(state, DistillDensePass(steps=20, label_weight=0.5))
    assert report["training"] == "end to end (all)"
    assert report["loss"]["last"] < report["loss"]["first"]
    with pytest.raises(MoecError, match="label weight must be in"):
        DistillDensePass(label_weight=1.5)


def test_distillation_warns_when_it_rereads_its_calibration_text(lm_calibration, caplog):
    source = moec.models.build_zoo("mixtral-lm")
    data = load_calibration(lm_calibration, source)
    for steps, warned in ((5, False), (30, True)):  # two rows a step
        caplog.clear()
        state = CompressionState(source, data)
        report = run_pass(state, DistillDensePass(steps=steps, batch_tokens=64))
        assert report["calibration_epochs"] == pytest.approx(steps * 2 / len(data.fit))
        assert ("calibration rows" in caplog.text) is warned


def test_block_steps_fit_each_block_before_end_to_end_training(lm_calibration):
    source = moec.models.build_zoo("mixtral-lm")
    state = CompressionState(source, load_calibration(lm_calibration, source))
    report = run_pass(state, DistillDensePass(steps=5, block_steps=30))
    assert report["training"] == "end to end (all)"
    for block in report["blocks"]:
        errors = block["rel_error"]
        assert errors["trained"] < errors["least_squares"] < errors["init"]
    with pytest.raises(MoecError, match="block steps must be >= 0"):
        DistillDensePass(block_steps=-1)


def test_partial_distillation_trains_each_block_alone(lm_calibration):
    source = moec.models.build_zoo("mixtral-lm")
    data = load_calibration(lm_calibration, source)
    state = CompressionState(source, data)
    report = run_pass(state, DistillDensePass(steps=20, blocks=["layers.1.moe"]))
    assert report["training"] == "per block" and state.moe_blocks() == ["layers.0.moe"]
    errors = report["blocks"][0]["rel_error"]
    assert errors["trained"] < errors["least_squares"] < errors["init"]


def test_distilled_models_lower_and_verify_with_the_shared_expert_folded_or_kept(
    tmp_path, lm_calibration
):
    notes = {}
    for name, target in (("deepseek-lm", "torch"), ("qwen-moe-lm", "ort"), ("mixtral-lm", "onnx")):
        passes = dict(distill_dense=True, distill_steps=5)
        result = moec.compile(
            f"zoo:{name}", target=target, output=tmp_path / name, calib=lm_calibration, **passes
        )
        record = next(p for p in result.manifest.passes if p["name"] == "distill-dense")
        notes[name] = {b["shared"] for b in record["report"]["blocks"]}
        # every weight trained: the artifact keeps the changed ones beside the dense FFNs
        assert "embed.weight" in result.manifest.compression["parameters"]
        assert not result.blocks  # no MoE block left to capture, and the notes say why
        assert (
            result.notes[-1]
            == "the lossy passes left no MoE block: each was replaced by a dense FFN"
        )
        assert not any("no MoE block found" in note for note in result.notes)
        assert moec.verify(result.path)
    assert notes == {
        "deepseek-lm": {"folded in"},
        "qwen-moe-lm": {"kept beside"},
        "mixtral-lm": {"none"},
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--distill-dense", "--dense-width", "0"], "--dense-width must be > 0"),
        (["--distill-dense", "--distill-blocks", "nope"], "not MoE blocks of this model"),
        (["--dense-width", "8"], "go with --distill-dense"),
        (["--distill-dense", "--distill-lr", "0"], "learning rate must be > 0"),
        (["--distill-dense", "--distill-batch-tokens", "0"], "batch tokens must be > 0"),
        (["--distill-dense", "--distill-block-steps", "-2"], "block steps must be >= 0"),
    ],
)
def test_bad_distillation_options(tmp_path, lm_calibration, args, message):
    result = CliRunner().invoke(
        main,
        [
            "compile",
            "zoo:mixtral-lm",
            "-o",
            str(tmp_path / "a"),
            "--calib",
            str(lm_calibration),
            *args,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_merging_experts_whose_neurons_are_permuted_copies_is_lossless():
    def permuted(e: int):
        gate, up, down = random_expert(0)
        order = torch.randperm(FFN, generator=torch.Generator().manual_seed(e))
        return gate[order], up[order], down[:, order]

    block = block_with(permuted, num_experts=4)
    state = state_for(block)
    run_pass(state, MergeExpertsPass(1, "random"))
    x = torch.randn(3, 11, H)
    assert (outputs(state.model, x) - outputs(block, x)).abs().max() <= 1e-5
