"""Load-time weight packing of ``torch`` artifacts: same numbers as the stored program, the dense
expert weights gone, and blocks it cannot pack left to the op's kernel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from moe_cases import CASES, H, random_weights
from torch.export import Dim

import moec
from moec.compiler.moe_block import MoEBlock
from moec.ir import MoEWeights
from moec.ir.expert_kernels import ONEDNN
from moec.ir.moe_op import moe_eager
from moec.runtime.weight_packing import MIN_PACKED_OUT_FEATURES, PackedMoE, pack_weights

pytestmark = pytest.mark.skipif(not ONEDNN, reason="this torch is built without oneDNN")
SHAPES = [(1, 1), (1, 13), (2, 8), (4, 32)]


def stored_program(block: MoEBlock, dtype=torch.float32) -> torch.fx.GraphModule:
    dynamic = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)
    x = torch.randn(2, 8, H, dtype=dtype)
    return torch.export.export(block, (x,), dynamic_shapes=dynamic).module()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_block_computes_the_ops_kernel(case):
    spec, weights = CASES[case], random_weights(case, seed=2)
    module = stored_program(MoEBlock(spec, weights))
    x = [torch.randn(b, s, H, generator=torch.Generator().manual_seed(b * s)) for b, s in SHAPES]
    with torch.no_grad():
        expected = [module(t) for t in x]
        report = pack_weights(module)
        got = [module(t) for t in x]
    assert report.moe_blocks == 1
    assert all(rel_l2(g, e) <= 1e-6 for g, e in zip(got, expected, strict=True))


@pytest.mark.parametrize("b, s", SHAPES)
def test_routing_given_as_ids_runs_like_the_ops_kernel(b, s):
    """Routing from the block's own router (ids and weights): the packed block computes what
    the op's kernel computes on the stored weights."""
    spec = dataclasses.replace(CASES["qwen-shared-gated"], routing="external")
    dense = random_weights("qwen-shared-gated", seed=3)
    weights = dataclasses.replace(dense, router_weight=None, output_bias=torch.randn(H))
    packed = PackedMoE(spec, weights)
    g = torch.Generator().manual_seed(b * s)
    x = torch.randn(b, s, H, generator=g)
    ids = torch.rand(b, s, spec.num_experts, generator=g).topk(spec.top_k, dim=-1).indices
    gates = torch.rand(b, s, spec.top_k, generator=g)
    with torch.no_grad():
        out, chosen = packed(x, ids, gates)
        expected, expected_chosen = moe_eager(spec, weights, x, ids, gates)
    assert rel_l2(out, expected) <= 1e-6 and torch.equal(chosen, expected_chosen)


@pytest.mark.parametrize(
    "case",
    [
        "gpt-oss",
        "plain-relu2",
        "qwen-shared-gated",
        "deepseek-v3",
        "mixtral",
        "llama4",
        "post-norm",
    ],
)
@pytest.mark.parametrize("repeated", [False, True])
def test_one_token_runs_like_the_ops_kernel(case, repeated):
    """At one token the packed block takes its own path (each chosen expert on the token, no
    gather or scatter): it computes what the op's kernel computes, for gated and plain experts,
    biases, shared experts with and without a gate, a [1, H] or [1, 1, H] token, and an expert
    a hash router chose twice (its outputs add up)."""
    spec = dataclasses.replace(CASES[case], routing="external", n_group=1, topk_group=1)
    weights = dataclasses.replace(random_weights(case, seed=5), router_weight=None)
    packed = PackedMoE(spec, weights)
    g = torch.Generator().manual_seed(7)
    shape = (1, H) if repeated else (1, 1, H)
    x = torch.randn(shape, generator=g)
    ids = torch.randperm(spec.num_experts, generator=g)[: spec.top_k].view(*shape[:-1], -1)
    if repeated:
        ids[..., -1] = ids[..., 0]
    gates = torch.rand(ids.shape, generator=g)
    with torch.no_grad():
        out, chosen = packed(x, ids, gates)
        expected, expected_chosen = moe_eager(spec, weights, x, ids, gates)
    assert rel_l2(out, expected) <= 1e-6 and torch.equal(chosen, expected_chosen)


def test_noop_conversions_are_dropped_and_their_weight_packed():
    class Router(torch.nn.Module):  # what families write: float32 casts around the router
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(64, H))  # 64 experts: packed

        def forward(self, x):
            return torch.nn.functional.linear(x.type(torch.float32), self.weight.float()).sigmoid()

    x = torch.randn(3, H)
    module = torch.export.export(Router(), (x,)).module()
    with torch.no_grad():
        expected = module(x)
        report = pack_weights(module)
        got = module(x)
    targets = {n.target for n in module.graph.nodes}
    assert report.conversions > 0 and report.linears == 1
    assert torch.ops.aten.to.dtype not in targets
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    assert rel_l2(got, expected) <= 1e-6


def test_a_linear_of_few_output_rows_stays_dense():
    """A router over 8 experts: fewer output rows than one block, where oneDNN's cost per call
    outweighs its kernel."""
    router = torch.nn.Linear(H, MIN_PACKED_OUT_FEATURES - 1, bias=False)
    module = torch.export.export(router, (torch.randn(3, H),)).module()
    report = pack_weights(module)
    assert report.linears == 0
    assert torch.ops.aten.linear.default in {n.target for n in module.graph.nodes}


def test_packing_drops_the_dense_weights():
    spec, weights = CASES["qwen-shared-gated"], random_weights("qwen-shared-gated")
    module = stored_program(MoEBlock(spec, weights))
    before = {n.rsplit(".", 1)[-1] for n in module.state_dict()}
    pack_weights(module)
    after = {n.rsplit(".", 1)[-1] for n in module.state_dict()}
    dropped = {"w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down"}
    assert before - after == dropped
    assert after == {"router_weight", "shared_expert_gate"}
    (packed,) = [m for m in module.modules() if isinstance(m, PackedMoE)]
    assert len(packed.first) == len(packed.down) == spec.num_experts
    first = packed.first[0]
    assert (first.out_features, first.in_features) == (2 * spec.expert_size, H)  # one GEMM


def test_a_bfloat16_block_keeps_the_ops_kernel():
    spec = CASES["mixtral"]
    weights = MoEWeights(**{n: t.bfloat16() for n, t in random_weights("mixtral").items()})
    block = MoEBlock(spec, weights)
    module = stored_program(block, torch.bfloat16)
    report = pack_weights(module)
    assert report.moe_blocks == 0
    x = torch.randn(1, 5, H, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_l2(module(x).float(), block(x).float()) <= 1e-2


def test_torch_artifact_is_packed_when_loaded(tmp_path):
    args = dict(target="torch", lowering="kernel", output=tmp_path / "a")
    result = moec.compile("zoo:qwen-moe-lm", **args)
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))
    with moec.load(result.path) as packed, moec.load(result.path, pack=False) as stored:
        assert packed.packing.moe_blocks == len(result.blocks)
        assert packed.packing.linears > 0  # attention and the LM head
        assert stored.packing.moe_blocks == 0
        a, b = packed(ids), stored(ids)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-6
