"""``moec place --simulate``: what one MoE layer's step would cost on N GPUs, from a measured
expert load, for the contiguous baseline and for a plan.

A step of one layer is the slowest GPU's expert GEMMs plus the all-to-all that carries the
(token, expert) pairs to their experts and back: dispatch and combine, each pair's hidden state
in ``bytes_per_value`` bytes, within a node over NVLink and across nodes over the network. The
model has E experts; for N GPUs it is scaled to ``max(E, N)`` experts by resampling the measured
per-expert load (the shape of the imbalance is kept), and every GPU serves ``tokens_per_gpu``
tokens per step. Defaults describe an H100 node (`H100`): they are parameters, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moec.runtime.placement_policies import contiguous, eplb, hierarchical

__all__ = ["GPU_COUNTS", "H100", "Hardware", "SimulatedStep", "redundant_for", "simulate"]


@dataclass(frozen=True)
class Hardware:
    """A GPU cluster as the cost model sees it."""

    flops: float  # dense bf16 GEMM rate one GPU reaches on expert GEMMs, FLOP/s
    nvlink: float  # bytes/s one GPU sends to GPUs of its node
    network: float  # bytes/s one GPU sends to other nodes
    gpus_per_node: int
    bytes_per_value: int


# An H100 node's published figures, as docs/expert_parallel.md states them: half of the dense
# bf16 peak on expert-sized GEMMs, NVLink 4 per direction, one NIC per GPU, bf16 activations
H100 = Hardware(flops=0.5 * 989e12, nvlink=450e9, network=50e9, gpus_per_node=8, bytes_per_value=2)


@dataclass
class SimulatedStep:
    gpus: int
    policy: str
    balance: float  # max/mean tokens per GPU
    compute_s: float
    all_to_all_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.all_to_all_s


def simulate(
    load: np.ndarray,
    *,
    hidden: int,
    expert_size: int,
    top_k: int,
    gpus: int,
    policy: str,
    redundant: int = 0,
    tokens_per_gpu: int = 4096,
    hardware: Hardware = H100,
) -> SimulatedStep:
    """One MoE layer's step on ``gpus`` GPUs placed by ``policy`` (contiguous, eplb or
    hierarchical) with ``redundant`` replicas, from the measured per-expert ``load``."""
    experts = max(len(load), gpus)
    sorted_load = np.sort(np.asarray(load, dtype=np.float64))[::-1]
    scaled = np.interp(np.linspace(0, 1, experts), np.linspace(0, 1, len(sorted_load)), sorted_load)
    scaled = np.random.default_rng(0).permutation(scaled)  # experts' order is arbitrary
    nodes = max(1, gpus // hardware.gpus_per_node)
    if policy == "contiguous":
        plan = contiguous("layer", scaled, gpus)
    elif policy == "hierarchical":
        groups = nodes * max(1, experts // (nodes * 8))
        plan = hierarchical("layer", scaled, gpus, nodes, redundant, groups)
    else:
        plan = eplb("layer", scaled, gpus, redundant)
    pairs = tokens_per_gpu * gpus * top_k
    per_gpu = plan.device_load(scaled / scaled.sum() * pairs)
    flops_per_pair = 2 * 3 * hidden * expert_size  # gate, up and down projections
    compute = per_gpu.max() * flops_per_pair / hardware.flops
    # each GPU sends the pairs of its tokens held elsewhere, and receives as many back
    sent = tokens_per_gpu * top_k * (gpus - 1) / gpus
    off_node = tokens_per_gpu * top_k * max(0, gpus - hardware.gpus_per_node) / gpus
    on_node = sent - off_node
    bytes_per_pair = 2 * hidden * hardware.bytes_per_value  # dispatch and combine
    exchange = on_node * bytes_per_pair / hardware.nvlink
    exchange += off_node * bytes_per_pair / hardware.network
    balance = float(per_gpu.max() / per_gpu.mean()) if per_gpu.mean() > 0 else 1.0
    # sends are even (every GPU has its own tokens); the busiest GPU receives `balance` times more
    return SimulatedStep(gpus, policy, balance, float(compute), float(exchange * balance))


GPU_COUNTS = (8, 16, 64, 256)


def redundant_for(experts: int, gpus: int) -> int:
    """At least ``gpus`` replicas, as many as make the slots fill every GPU alike."""
    return gpus + (-max(experts, gpus)) % gpus
