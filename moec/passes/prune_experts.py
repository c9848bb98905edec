"""``prune-experts``: keep the KEEP most valuable experts of each block, drop the rest.

Value (``method``), measured on calibration tokens:

- ``frequency``: how often the expert is chosen;
- ``reap`` (REAP saliency): the mean, over the tokens routed to the expert, of its gate times
  the norm of its output;
- ``reconstruction``: greedy; repeatedly drop the expert whose removal changes the block's
  output least, until KEEP remain.

Where moec routes the block (top-k or expert-choice routing without expert groups), the router's
rows of the dropped experts go too, so tokens choose among the kept experts. Behind a family's
own router, with expert groups, or after merging, the router is kept and a dropped expert is
mapped to nothing (``expert_map`` -1): tokens routed to it lose that expert's contribution.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from moec.compiler.moe_block import op_block
from moec.errors import MoecError
from moec.ir import MoESpec, MoEWeights, route, router_logits
from moec.ir.expert_kernels import expert_ffn
from moec.passes.compression_state import (
    EXPERT_TENSORS,
    BlockStats,
    CompressionState,
    expert_outputs,
    experts_to_keep,
)
from moec.passes.pass_base import Pass, PassResult
from moec.settings import PRUNE_METHODS

__all__ = ["PruneExpertsPass", "prune_block"]

RECONSTRUCTION_TOKENS = 1024


class PruneExpertsPass(Pass[CompressionState]):
    name = "prune-experts"
    description = "drop the least valuable experts of each block (frequency, REAP, reconstruction)"
    in_place = True  # it replaces blocks of the state it is given
    lossy = True

    def __init__(self, keep: float | int, method: str = "frequency"):
        if method not in PRUNE_METHODS:
            raise MoecError(f"--prune-method {method!r}: choose one of {PRUNE_METHODS}")
        self.keep, self.method = keep, method

    def call(self, state: CompressionState) -> PassResult[CompressionState]:
        stats = state.stats()
        blocks = []
        for name in state.moe_blocks():
            spec, weights = state.moe(name)
            count = experts_to_keep(self.keep, spec.num_experts, "--prune-experts", name)
            if count == spec.num_experts or name not in stats:
                continue
            reroute = reroutes(spec)
            if reroute and count < spec.top_k:
                raise MoecError(
                    f"--prune-experts {self.keep!r} keeps {count} experts of block {name}, fewer "
                    f"than the {spec.top_k} each token chooses; keep at least {spec.top_k}"
                )
            kept = self._choose(spec, weights, stats[name], count, reroute)
            state.replace(name, op_block(*prune_block(spec, weights, kept, reroute)))
            dropped = sorted(set(range(spec.num_experts)) - set(kept))
            blocks.append(
                {
                    "block": name,
                    "experts": spec.num_experts,
                    "kept": count,
                    "dropped": dropped,
                    "router": "rows dropped" if reroute else "kept, dropped experts unmapped",
                }
            )
        return PassResult(state, bool(blocks), {"method": self.method, "blocks": blocks})

    def _choose(
        self, spec: MoESpec, weights: MoEWeights, stats: BlockStats, count: int, reroute: bool
    ) -> list[int]:
        if self.method == "reconstruction":
            return _greedy_reconstruction(spec, weights, stats, count, reroute)
        if self.method == "frequency":
            value = stats.frequency.double()
        else:
            value = torch.zeros(spec.num_experts, dtype=torch.float64)
            for e in range(spec.num_experts):
                rows = stats.chosen[:, e]
                if rows.any():
                    with torch.no_grad():
                        norms = expert_ffn(spec, weights, e, stats.x[rows]).double().norm(dim=-1)
                    value[e] = (stats.weights[rows, e].double() * norms).mean()
        order = np.argsort(-value.numpy(), kind="stable")
        return sorted(order[:count].tolist())


def reroutes(spec: MoESpec) -> bool:
    """Whether pruning drops router rows (moec routes the block, no groups, no expert map)."""
    return spec.routing != "external" and spec.n_group == 1 and spec.expert_map is None


def prune_block(
    spec: MoESpec, weights: MoEWeights, kept: list[int], reroute: bool
) -> tuple[MoESpec, MoEWeights]:
    """The block with only the stored experts ``kept`` (see module docstring for the router)."""
    index = torch.tensor(kept)
    sliced = {
        n: getattr(weights, n)[index] for n in EXPERT_TENSORS if getattr(weights, n) is not None
    }
    if reroute:
        for n in ("router_weight", "router_bias", "selection_bias"):
            if getattr(weights, n) is not None:
                sliced[n] = getattr(weights, n)[index]
        return dataclasses.replace(spec, num_experts=len(kept)), dataclasses.replace(
            weights, **sliced
        )
    new_index = {e: i for i, e in enumerate(kept)}
    old_map = spec.expert_map or tuple(range(spec.num_experts))
    new_map = tuple(new_index.get(e, -1) for e in old_map)
    new_spec = dataclasses.replace(spec, num_experts=len(kept), expert_map=new_map)
    return new_spec, dataclasses.replace(weights, **sliced)


def _greedy_reconstruction(
    spec: MoESpec, weights: MoEWeights, stats: BlockStats, count: int, reroute: bool
) -> list[int]:
    rows = torch.randperm(stats.tokens, generator=torch.Generator().manual_seed(0))
    rows = rows[:RECONSTRUCTION_TOKENS]
    x = stats.x[rows]
    outputs = expert_outputs(spec, weights, x).double()  # [E, n, H]
    logits = router_logits(x, weights.router_weight, weights.router_bias) if reroute else None
    base = stats.weights[rows].double()

    def block_output(kept: list[int]) -> torch.Tensor:
        if reroute:
            sub = dataclasses.replace(spec, num_experts=len(kept))
            bias = weights.selection_bias
            gates, _ = route(sub, logits[:, kept], None if bias is None else bias[kept])
            gates = gates.double()
        else:
            gates = base[:, kept]
        return torch.einsum("enh,ne->nh", outputs[kept], gates)

    reference = block_output(list(range(spec.num_experts)))
    kept = list(range(spec.num_experts))
    while len(kept) > count:
        errors = [
            (block_output([k for k in kept if k != e]) - reference).square().sum().item()
            for e in kept
        ]
        kept.pop(int(np.argmin(errors)))
    return kept
