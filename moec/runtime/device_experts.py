"""Experts over the devices of one process: ``moec.load(OUT, devices=["cuda:0", "cuda:1"])``
runs a ``torch`` artifact with its MoE blocks' experts spread by the artifact's placement, as
the expert-parallel runtime spreads them over ranks, with device copies in place of the
collectives.

The program's other ops and weights are on the first device. Each MoE op routes there, sends
each (token, expert) pair's row to a device holding the expert (a replicated expert's pairs
alternate over its replicas by token, as over ranks), runs that device's experts with the
block's experts kernel, and adds the results, brought back, into the output with the gates.
Devices are visited in turn; on CUDA their kernels still overlap, as launches do not wait.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moec.errors import ArtifactError, UsageError
from moec.ir.moe_op import experts_kernel, moe_eager
from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import EXPERT_WEIGHTS, MoEWeights
from moec.runtime.expert_parallel import holder_tables, pair_experts, slot_weights
from moec.runtime.placement import BlockPlacement

__all__ = ["ExpertsOverDevices", "check_devices"]


def check_devices(devices) -> list[torch.device]:
    """``devices`` (names such as ``"cpu"``, ``"cuda:1"``) as torch devices, each one that
    exists on this machine; a `UsageError` naming the first that does not."""
    if isinstance(devices, (str, torch.device)) or not devices:
        raise UsageError(f"devices={devices!r}: give a list of device names, e.g. ['cuda:0']")
    found = []
    for name in devices:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as e:
            raise UsageError(
                f"device {name!r} is not a torch device name (cpu, cuda:0, ...)"
            ) from e
        if device.type != "cpu":
            backend = getattr(torch, device.type, None)
            count = backend.device_count() if backend and backend.is_available() else 0
            index = 0 if device.index is None else device.index
            if index >= count:
                raise UsageError(
                    f"device {name!r} does not exist: this machine has {count} {device.type} "
                    "device(s)"
                )
            device = torch.device(device.type, index)
        found.append(device)
    return found


class ExpertsOverDevices(nn.Module):
    """One MoE block with its experts over ``devices`` (one per placement device):
    ``forward(x, routed_ids, routed_weights) -> (out, chosen)``, the results of
    ``torch.ops.moec.moe``."""

    def __init__(
        self,
        spec: MoESpec,
        weights: MoEWeights,
        placed: BlockPlacement,
        devices: list[torch.device],
    ):
        super().__init__()
        if placed.devices != len(devices):
            raise ArtifactError(
                f"the placement puts block {placed.block or '(model)'} on {placed.devices} "
                f"devices, the runner was given {len(devices)}; place the artifact for "
                f"{len(devices)}"
            )
        self.spec, self.devices, self.placed = spec, devices, placed
        self.routing = dataclasses.replace(weights, **dict.fromkeys(EXPERT_WEIGHTS))
        self.local = [
            slot_weights(weights, s, d) for s, d in zip(placed.slots, devices, strict=True)
        ]
        self.replicas, self.holder_device, self.holder_slot = holder_tables(placed, devices[0])

    def held(self) -> list[MoEWeights]:
        """The expert weights each device holds."""
        return self.local

    def move_to(self, placed: BlockPlacement) -> int:
        """Take ``placed`` as this block's placement: each device gets the experts it newly
        holds from a device that held them. Returns how many expert replicas moved."""
        before = self.placed
        if placed.devices != len(self.devices):
            raise UsageError(
                f"the placement is for {placed.devices} devices, the runner has {len(self.devices)}"
            )
        names = [n for n in EXPERT_WEIGHTS if getattr(self.local[0], n) is not None]
        moves, local = 0, []
        for device, (experts, target) in enumerate(zip(placed.slots, self.devices, strict=True)):
            moves += sum(e not in before.slots[device] for e in experts)
            tensors = {}
            for n in names:
                rows = []
                for e in experts:
                    if e in before.slots[device]:  # kept where it is
                        d, s = device, before.slots[device].index(e)
                    else:
                        d, s = before.holders(e)[0]
                    rows.append(getattr(self.local[d], n)[s].to(target))
                tensors[n] = torch.stack(rows)
            local.append(dataclasses.replace(self.local[device], **tensors))
        self.local, self.placed = local, placed
        self.replicas, self.holder_device, self.holder_slot = holder_tables(placed, self.devices[0])
        return moves

    def forward(self, x, routed_ids=None, routed_weights=None):
        return moe_eager(
            self.spec, self.routing, x, routed_ids, routed_weights, experts=self._dispatch
        )

    def _dispatch(self, out, x, tokens, counts, gates):
        """`moe_eager`'s experts step over the devices (module docstring)."""
        expert = pair_experts(counts, tokens.device)
        which = tokens % self.replicas[expert]
        dest, slot = self.holder_device[expert, which], self.holder_slot[expert, which]
        kernel = experts_kernel(self.spec.lowering)
        for index, device in enumerate(self.devices):
            pairs = torch.nonzero(dest == index).squeeze(1)
            if not len(pairs):
                continue
            pairs = pairs[torch.argsort(slot[pairs], stable=True)]
            counts_here = torch.bincount(slot[pairs], minlength=len(self.placed.slots[index]))
            rows = x.index_select(0, tokens[pairs]).to(device)
            results = kernel(self.spec, self.local[index], rows, counts_here.tolist())
            out.index_add_(0, tokens[pairs], results.to(out.device) * gates[pairs].unsqueeze(-1))
        return out
