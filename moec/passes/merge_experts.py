"""``merge-experts``: fewer experts per block, each a frequency-weighted average of a cluster.

Clustering (``method``):

- ``hc`` (HC-SMoE): hierarchical clustering with average linkage of the experts' outputs on
  calibration tokens (each expert's outputs on the same tokens, compared by Euclidean distance).
- ``router-logits`` (M-SMoE-style grouping): the KEEP most used experts are the groups' centres;
  every other expert joins the centre whose router logits over the calibration tokens are most
  alike (cosine). Behind a family's own router, its combine weights stand in for the logits.
- ``random``: a seeded random partition, the baseline.

Each cluster becomes one expert whose tensors are the members' average weighted by how often
each served on calibration tokens, after each member's hidden neurons are permuted to line up
with those of the cluster's most used member (an assignment problem on the neurons' weights, as
M-SMoE aligns experts before merging; experts wider than 4096 are merged unaligned). The router
is kept: its experts are mapped onto the merged ones (``MoESpec.expert_map``) so that the gates
of a token's experts in one cluster add up.
With ``correct``, the merged down projection is then refitted by ridge least squares so that on
the calibration tokens routed to the cluster the merged expert reproduces the members' gate-
weighted output.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.optimize import linear_sum_assignment

from moec.compiler.moe_block import op_block
from moec.errors import MoecError
from moec.ir import MoESpec, MoEWeights, router_logits
from moec.ir.expert_kernels import expert_ffn, expert_hidden
from moec.passes.compression_state import (
    EXPERT_TENSORS,
    BlockStats,
    CompressionState,
    expert_outputs,
    experts_to_keep,
    ridge_least_squares,
)
from moec.passes.pass_base import Pass, PassResult
from moec.settings import MERGE_METHODS

__all__ = ["MergeExpertsPass", "merge_clusters"]

CLUSTER_TOKENS = 512  # tokens whose outputs describe an expert for clustering
RIDGE = 1e-3
ALIGN_MAX_WIDTH = 4096


class MergeExpertsPass(Pass[CompressionState]):
    name = "merge-experts"
    description = "cluster experts on calibration data, merge each cluster, remap the router"
    in_place = True  # it replaces blocks of the state it is given
    lossy = True

    def __init__(self, keep: float | int, method: str = "hc", correct: bool = False, seed: int = 0):
        if method not in MERGE_METHODS:
            raise MoecError(f"--merge-method {method!r}: choose one of {MERGE_METHODS}")
        self.keep, self.method, self.correct, self.seed = keep, method, correct, seed

    def call(self, state: CompressionState) -> PassResult[CompressionState]:
        stats = state.stats()
        blocks = []
        for index, name in enumerate(state.moe_blocks()):
            spec, weights = state.moe(name)
            count = experts_to_keep(self.keep, spec.num_experts, "--merge-experts", name)
            if count == spec.num_experts or name not in stats:
                continue
            labels = self._cluster(spec, weights, stats[name], count, index)
            new_spec, merged = merge_clusters(spec, weights, labels, stats[name].frequency)
            if self.correct:
                merged = _refit_down(new_spec, merged, spec, weights, stats[name], labels)
            state.replace(name, op_block(new_spec, merged))
            clusters = [np.flatnonzero(labels == c).tolist() for c in range(count)]
            blocks.append(
                {
                    "block": name,
                    "experts": spec.num_experts,
                    "kept": count,
                    "clusters": [c for c in clusters if len(c) > 1],
                }
            )
        report = {"method": self.method, "least_squares": self.correct, "blocks": blocks}
        return PassResult(state, bool(blocks), report)

    def _cluster(
        self, spec: MoESpec, weights: MoEWeights, stats: BlockStats, count: int, index: int
    ) -> np.ndarray:
        if self.method == "random":
            rng = np.random.default_rng([self.seed, index])
            labels = np.concatenate(
                [np.arange(count), rng.integers(0, count, spec.num_experts - count)]
            )
            return rng.permutation(labels)
        if self.method == "hc":
            rng = np.random.default_rng([self.seed, index])
            rows = rng.permutation(stats.tokens)[:CLUSTER_TOKENS]
            outputs = expert_outputs(spec, weights, stats.x[rows])  # [E, n, H]
            features = outputs.reshape(spec.num_experts, -1).double().numpy()
            tree = linkage(features, method="average", metric="euclidean")
            return cut_tree(tree, n_clusters=count).reshape(-1)
        return _router_groups(spec, weights, stats, count)


def merge_clusters(
    spec: MoESpec, weights: MoEWeights, labels: np.ndarray, frequency: torch.Tensor
) -> tuple[MoESpec, MoEWeights]:
    """The block with each cluster (``labels`` [E] in 0..K-1) merged into one expert: members'
    neurons aligned to the most used member's, then averaged weighted by frequency."""
    count = int(labels.max()) + 1
    freq = frequency.double().clamp_min(1e-12)
    mix = torch.zeros(count, spec.num_experts, dtype=torch.float64)
    for c in range(count):
        members = torch.from_numpy(np.flatnonzero(labels == c))
        mix[c, members] = freq[members] / freq[members].sum()
    weights = _aligned(spec, weights, labels, freq)
    merged = {}
    for name in EXPERT_TENSORS:
        tensor = getattr(weights, name)
        if tensor is not None:
            flat = mix @ tensor.double().reshape(spec.num_experts, -1)
            merged[name] = flat.reshape(count, *tensor.shape[1:]).to(tensor.dtype)
    old_map = spec.expert_map or tuple(range(spec.num_experts))
    new_map = tuple(int(labels[e]) if e >= 0 else -1 for e in old_map)
    new_spec = dataclasses.replace(spec, num_experts=count, expert_map=new_map)
    return new_spec, dataclasses.replace(weights, **merged)


def _aligned(
    spec: MoESpec, weights: MoEWeights, labels: np.ndarray, freq: torch.Tensor
) -> MoEWeights:
    """Weights with each cluster member's neurons permuted to match its anchor's (the most used
    member): an expert's hidden neurons can be listed in any order, and averaging two experts is
    only meaningful neuron by neuron. Matched by the largest total dot product of each neuron's
    weights (its rows in gate and up, its column in down), solved as an assignment problem.
    Skipped for experts wider than ``ALIGN_MAX_WIDTH`` (the problem grows as width^2)."""
    if spec.expert_size > ALIGN_MAX_WIDTH:
        return weights
    rows = [n for n in ("w_gate", "w_up", "b_gate", "b_up") if getattr(weights, n) is not None]
    tensors = {n: getattr(weights, n).clone() for n in (*rows, "w_down")}

    def neurons(e: int) -> torch.Tensor:  # [I, features]
        parts = [tensors[n][e].reshape(spec.expert_size, -1) for n in rows]
        return torch.cat([*parts, tensors["w_down"][e].T], dim=1).double()

    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        anchor = int(members[np.argmax(freq[members].numpy())])
        for e in members:
            if e == anchor:
                continue
            similarity = (neurons(anchor) @ neurons(int(e)).T).numpy()
            _, order = linear_sum_assignment(similarity, maximize=True)
            order = torch.from_numpy(order)
            for n in rows:
                tensors[n][e] = tensors[n][e][order]
            tensors["w_down"][e] = tensors["w_down"][e][:, order]
    return dataclasses.replace(weights, **tensors)


def _router_groups(spec: MoESpec, weights: MoEWeights, stats: BlockStats, count: int) -> np.ndarray:
    """M-SMoE: the most used experts are centres; the others join the most alike centre."""
    if spec.routing == "external" or spec.expert_map is not None:
        columns = stats.weights  # [N, E]: the router's output per stored expert
    else:
        columns = router_logits(stats.x, weights.router_weight, weights.router_bias)
    columns = columns.double()
    columns = columns - columns.mean(0)
    columns = columns / columns.norm(dim=0).clamp_min(1e-12)
    similarity = (columns.T @ columns).numpy()  # [E, E] cosine
    centres = np.argsort(-stats.frequency.numpy(), kind="stable")[:count]
    labels = np.argmax(similarity[:, centres], axis=1)
    labels[centres] = np.arange(count)
    return labels


def _refit_down(
    spec: MoESpec,
    merged: MoEWeights,
    old_spec: MoESpec,
    old: MoEWeights,
    stats: BlockStats,
    labels: np.ndarray,
) -> MoEWeights:
    """Ridge least squares for each merged cluster's down projection (see module docstring)."""
    w_down = merged.w_down.clone()
    for c in range(spec.num_experts):
        members = np.flatnonzero(labels == c)
        gates = stats.weights[:, members]  # [N, m]
        rows = gates.sum(1) > 0
        if len(members) < 2 or int(rows.sum()) < 2:
            continue
        x, gates = stats.x[rows], gates[rows].double()
        with torch.no_grad():
            target = sum(
                gates[:, j : j + 1] * expert_ffn(old_spec, old, int(e), x).double()
                for j, e in enumerate(members)
            ) / gates.sum(1, keepdim=True)
            hidden = expert_hidden(spec, merged, c, x).double()
        if merged.b_down is not None:
            target = target - merged.b_down[c].double()
        solution = ridge_least_squares(hidden, target, RIDGE)
        w_down[c] = solution.T.to(w_down.dtype)
    return dataclasses.replace(merged, w_down=w_down)
