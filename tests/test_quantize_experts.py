"""``quantize-experts``: int8/int4 expert weights, their quality report, their ONNX lowering
(blocked DequantizeLinear), and artifacts verified against the dequantised model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hf_families import save_tiny

import moec
from moec.cli import main
from moec.errors import MoecError, SettingsError
from moec.ir import MoESpec, MoEWeights, moe_eager
from moec.ir.quantized_experts import dequantize, quantize, quantize_block

FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 128, (24, 32)))
    return path


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_is_within_half_a_step(bits, block, symmetric):
    w = torch.randn(3, 8, 32) * torch.rand(3, 8, 1)
    codes, scale, zero = quantize(w, bits, block, symmetric)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    assert (zero is None) == symmetric
    back = dequantize(codes, scale, zero, bits)
    steps = scale.repeat_interleave(32 // scale.shape[-1], -1)
    assert bool(((back - w).abs() <= steps / 2 + 1e-6).all())
    assert back.dtype == w.dtype and back.shape == w.shape


def test_a_zero_weight_stays_zero():
    w = torch.rand(2, 4, 16) + 0.5  # all positive: the range is widened to hold 0
    w[:, :, 3] = 0
    for symmetric in (True, False):
        back = dequantize(*quantize(w, 4, 16, symmetric), 4)
        assert bool((back[:, :, 3] == 0).all())


def test_the_op_on_a_quantised_block_is_the_dequantised_block():
    spec = MoESpec(num_experts=4, top_k=2, hidden_size=32, expert_size=16)
    weights = MoEWeights(
        router_weight=torch.randn(4, 32),
        w_gate=torch.randn(4, 16, 32),
        w_up=torch.randn(4, 16, 32),
        w_down=torch.randn(4, 32, 16),
    )
    qspec, qweights = quantize_block(spec, weights, 4, 16, False)
    qweights.check(qspec)
    plain = MoEWeights(
        router_weight=weights.router_weight,
        **{
            n: dequantize(
                getattr(qweights, n),
                getattr(qweights, f"{n}_scale"),
                getattr(qweights, f"{n}_zero"),
                4,
            )
            for n in ("w_gate", "w_up", "w_down")
        },
    )
    x = torch.randn(2, 5, 32)
    assert torch.equal(moe_eager(qspec, qweights, x)[0], moe_eager(spec, plain, x)[0])


@pytest.mark.parametrize(
    ("quantize", "block_size", "symmetric"), [("int4", 16, False), ("int8", 0, True)]
)
def test_quantised_lm_lowers_to_dequantize_linear_and_verifies(
    tmp_path, ids, quantize, block_size, symmetric
):
    result = moec.compile(
        "zoo:mixtral-lm",
        target="onnx",
        output=tmp_path / "a",
        calib=ids,
        quantize=quantize,
        block_size=block_size,
        symmetric=symmetric,
    )
    quality = result.manifest.compression["quality"]
    moe = quality["moe_parameters"]
    codes = 1 / 8 if quantize == "int4" else 1 / 4  # of float32 experts; scales come on top
    assert codes < moe["bytes_after"] / moe["bytes_before"] < codes + 0.1
    assert quality["top1_agreement"] > 0.9
    model = onnx.load(result.path / "model.onnx")
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(n.input[0] in {i.name for i in model.graph.initializer} for n in dq)
    expert_floats = [
        i.name
        for i in model.graph.initializer
        if i.data_type in FLOATS and len(i.dims) >= 2 and i.dims[0] * i.dims[-1] >= 32 * 64
    ]
    assert not [n for n in expert_floats if "moe.w_" in n], expert_floats
    layout = ("Transpose", "Gather", "Concat")
    users = {i for n in model.graph.node if n.op_type in layout for i in n.input}
    assert not users & {n.output[0] for n in dq}  # the layout ops were folded into the codes
    report = moec.verify(result.path)
    assert report, report.to_dict()


@pytest.mark.parametrize("target", ["torch", "ort"])
def test_merge_then_quantise_composes(tmp_path, ids, target):
    result = moec.compile(
        "zoo:qwen-moe-lm",
        target=target,
        output=tmp_path / "a",
        calib=ids,
        merge_experts=0.75,
        quantize="int4",
        block_size=16,
    )
    lossy = [p["name"] for p in result.manifest.passes if p["lossy"]]
    assert lossy == ["merge-experts", "quantize-experts"]
    assert moec.verify(result.path)


def test_tiny_hf_mixtral_quantised_verifies(tmp_path, ids):
    source = save_tiny("mixtral", tmp_path / "src")
    result = moec.compile(
        f"hf:{source}",
        target="onnx",
        output=tmp_path / "a",
        calib=ids,
        quantize="int4",
        block_size=32,
    )
    assert all("int4/32" in b.summary for b in result.blocks)
    assert moec.verify(result.path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int4", "--block-size", "128"], "does not divide the hidden size 32"),
        (["--quantize", "int4", "--block-size", "24"], "a power of 2 of at least 16"),
        (["--block-size", "32"], "--block-size needs --quantize"),
        (["--quantize", "int4", "--target", "trt"], "add --symmetric"),
        (["--quantize", "int8", "--symmetric", "--target", "trt"], "as int4 only"),
        (["--quantize", "int2"], "int2"),
    ],
)
def test_bad_quantisation_options(tmp_path, ids, args, message):
    result = CliRunner().invoke(
        main, ["compile", "zoo:mixtral-lm", "-o", str(tmp_path / "a"), "--calib", str(ids), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "a").exists()


def test_block_size_error_names_the_sizes_that_fit(tmp_path, ids):
    with pytest.raises(MoecError, match=r"--block-size 16 or 32 divide\(s\) both"):
        moec.compile(
            "zoo:mixtral-lm", output=tmp_path / "a", calib=ids, quantize="int4", block_size=128
        )


def test_quantising_a_model_without_moe_blocks_is_refused(tmp_path, ids):
    dense = torch.nn.Sequential(torch.nn.Linear(8, 8))
    calib = tmp_path / "x.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    with pytest.raises(MoecError, match="add --quantize-dense"):
        moec.compile(
            dense,
            example_inputs=torch.randn(2, 8),
            output=tmp_path / "a",
            calib=calib,
            quantize="int8",
        )
    result = moec.compile(
        dense,
        example_inputs=torch.randn(2, 8),
        target="onnx",
        output=tmp_path / "b",
        calib=calib,
        quantize="int8",
        quantize_dense=True,
    )
    assert [b["kind"] for b in result.manifest.compression["blocks"]] == ["linear"]
    assert moec.verify(result.path, source=dense)


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_quantize_dense_quantises_the_other_linear_layers(tmp_path, ids, target):
    result = moec.compile(
        "zoo:mixtral-lm",
        target=target,
        output=tmp_path / "a",
        calib=ids,
        quantize="int4",
        block_size=16,
        quantize_dense=True,
    )
    kinds = [b["kind"] for b in result.manifest.compression["blocks"]]
    assert kinds.count("moe") == 2 and kinds.count("linear") >= 5  # attention and the head
    quality = result.manifest.compression["quality"]
    assert quality["parameters"]["bytes_after"] < 0.3 * quality["parameters"]["bytes_before"]
    if target == "onnx":
        model = onnx.load(result.path / "model.onnx")
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) >= 2 * 8 * 2 + 5  # per expert: gate and up as one, down; the layers
    assert moec.verify(result.path)


def test_settings_default_block_sizes():
    from moec.settings import CompileSettings

    four = CompileSettings.from_flags({"quantize": "int4", "calib": "x.npy"}).quantize
    eight = CompileSettings.from_flags({"quantize": "int8", "calib": "x.npy"}).quantize
    assert (four.block_size, eight.block_size) == (32, None)
    with pytest.raises(SettingsError, match="--calib"):
        CompileSettings.from_flags({"quantize": "int8"})
