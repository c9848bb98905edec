"""Placement policies: where each expert of a block goes, from its load (tokens per expert).

After DeepSeek's EPLB, as pure functions on load arrays:

- `contiguous`: experts split in order, no replicas (the baseline);
- `eplb`: `replicate` adds ``redundant`` replicas one at a time to the expert with the most load
  per replica, then `balanced_packing` puts the replicas, heaviest first, on the least loaded
  device with a free slot, and `swap_down` swaps replicas off the busiest device while that
  lowers it (EPLB stops after the packing);
- `hierarchical`: the block's expert groups packed to nodes first, then replicas and packing
  within each node (when groups divide evenly over nodes; `eplb` otherwise);
- `rebalance`: from a running placement, at most ``max_moves`` expert moves (swaps between the
  busiest and the idlest device) that lower the busiest device's load.
"""

from __future__ import annotations

import numpy as np

from moec.errors import SettingsError
from moec.runtime.placement import BlockPlacement

__all__ = [
    "balanced_packing",
    "contiguous",
    "eplb",
    "hierarchical",
    "moved",
    "rebalance",
    "replicate",
    "swap_down",
]

Slots = tuple[tuple[int, ...], ...]


def contiguous(block: str, load: np.ndarray, devices: int) -> BlockPlacement:
    """Experts in order, as evenly as they divide, no replicas."""
    parts = np.array_split(np.arange(len(load)), devices)
    return BlockPlacement(block, len(load), tuple(tuple(int(e) for e in p) for p in parts))


def replicate(load: np.ndarray, physical: int) -> np.ndarray:
    """[E] replicas per expert for ``physical`` slots: one each, then one at a time to the
    expert with the most load per replica."""
    load = np.asarray(load, dtype=np.float64)
    count = np.ones(len(load), dtype=np.int64)
    for _ in range(physical - len(load)):
        count[int(np.argmax(load / count))] += 1
    return count


def balanced_packing(
    weights: np.ndarray, packs: int, kinds: np.ndarray | None = None
) -> list[list[int]]:
    """Items (indices of ``weights``) into ``packs`` packs of equal count: heaviest first, each
    to the lightest pack with room, preferring one without an item of the same ``kind`` (two
    replicas of one expert on one device serve nothing more)."""
    per_pack = len(weights) // packs
    if per_pack * packs != len(weights):
        raise ValueError(f"{len(weights)} items do not divide into {packs} packs")
    kinds = np.arange(len(weights)) if kinds is None else np.asarray(kinds)
    totals, contents = np.zeros(packs), [[] for _ in range(packs)]
    for item in np.argsort(-np.asarray(weights, dtype=np.float64), kind="stable"):
        open_packs = [p for p in range(packs) if len(contents[p]) < per_pack]
        fresh = [p for p in open_packs if all(kinds[i] != kinds[item] for i in contents[p])]
        pack = min(fresh or open_packs, key=lambda p: (totals[p], p))
        contents[pack].append(int(item))
        totals[pack] += weights[item]
    return contents


def eplb(block: str, load: np.ndarray, devices: int, redundant: int) -> BlockPlacement:
    """Replicate the most loaded experts, pack the replicas over the devices, then swap them
    off the busiest device while that lowers it."""
    experts = len(load)
    _check_slots(block, experts, devices, redundant)
    count = replicate(load, experts + redundant)
    physical = np.repeat(np.arange(experts), count)  # logical expert of each replica
    share = np.asarray(load, dtype=np.float64)[physical] / count[physical]
    packs = balanced_packing(share, devices, kinds=physical)
    packs = swap_down(packs, share, physical, max_swaps=4 * len(physical))
    slots = tuple(tuple(sorted(int(physical[i]) for i in pack)) for pack in packs)
    return BlockPlacement(block, experts, slots)


def hierarchical(
    block: str, load: np.ndarray, devices: int, nodes: int, redundant: int, groups: int
) -> BlockPlacement:
    """Groups to nodes, then `eplb` within each node over its devices."""
    experts = len(load)
    _check_slots(block, experts, devices, redundant)
    if groups < 1 or experts % groups or groups % nodes or devices % nodes or redundant % nodes:
        return eplb(block, load, devices, redundant)
    size = experts // groups
    group_load = np.asarray(load, dtype=np.float64).reshape(groups, size).sum(1)
    slots: list[tuple[int, ...]] = []
    for node_groups in balanced_packing(group_load, nodes):
        members = np.concatenate([np.arange(g * size, (g + 1) * size) for g in node_groups])
        inner = eplb(block, np.asarray(load)[members], devices // nodes, redundant // nodes)
        slots += [tuple(sorted(int(members[e]) for e in device)) for device in inner.slots]
    return BlockPlacement(block, experts, tuple(slots))


def rebalance(current: BlockPlacement, load: np.ndarray, max_moves: int) -> BlockPlacement:
    """At most ``max_moves`` experts moved (each swap between the busiest device and another
    moves two), each swap the one that lowers the busiest device's load the most."""
    share = np.asarray(load, dtype=np.float64) / current.replicas
    items = [expert for device in current.slots for expert in device]
    packs, start = [], 0
    for device in current.slots:
        packs.append(list(range(start, start + len(device))))
        start += len(device)
    packs = swap_down(packs, share[items], np.asarray(items), max_moves // 2)
    slots = tuple(tuple(sorted(items[i] for i in pack)) for pack in packs)
    return BlockPlacement(current.block, current.experts, slots)


def swap_down(
    packs: list[list[int]], weights: np.ndarray, kinds: np.ndarray, max_swaps: int
) -> list[list[int]]:
    """Packs after at most ``max_swaps`` swaps, each between the busiest pack and another, the
    one that lowers the busier of the two the most; never two items of a kind in one pack."""
    packs = [list(pack) for pack in packs]
    for _ in range(max_swaps):
        totals = np.array([weights[pack].sum() for pack in packs])
        busiest = int(np.argmax(totals))
        best = None
        for other, pack in enumerate(packs):
            if other == busiest:
                continue
            for i, a in enumerate(packs[busiest]):
                for j, b in enumerate(pack):
                    gain = weights[a] - weights[b]
                    peak = max(totals[busiest] - gain, totals[other] + gain)
                    if gain <= 0 or peak >= totals[busiest] - 1e-12:
                        continue
                    if kinds[a] in kinds[pack] or kinds[b] in kinds[packs[busiest]]:
                        continue
                    if best is None or peak < best[0]:
                        best = (peak, other, i, j)
        if best is None:
            break
        _, other, i, j = best
        packs[busiest][i], packs[other][j] = packs[other][j], packs[busiest][i]
    return packs


def moved(before: BlockPlacement, after: BlockPlacement) -> int:
    """How many expert replicas a device must receive to go from ``before`` to ``after``."""
    count = 0
    for old, new in zip(before.slots, after.slots, strict=True):
        remaining = list(old)
        for expert in new:
            if expert in remaining:
                remaining.remove(expert)
            else:
                count += 1
    return count


def _check_slots(block: str, experts: int, devices: int, redundant: int) -> None:
    if redundant < 0 or (experts + redundant) % devices:
        raise SettingsError(
            f"block {block or '(model)'}: {experts} experts and --redundant {redundant} make "
            f"{experts + redundant} slots, which do not divide over {devices} devices; choose "
            "--redundant so that experts + redundant is a multiple of --devices"
        )
    if redundant > experts * (devices - 1):
        raise SettingsError(
            f"--redundant {redundant} is more replicas than {devices} devices can hold of "
            f"{experts} experts (at most one copy per device: {experts * (devices - 1)})"
        )
