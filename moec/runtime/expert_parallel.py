"""Expert parallelism: a loaded ``torch`` program's MoE blocks run with their experts spread over
the ranks of a torch.distributed group (gloo on CPU, NCCL on CUDA), as a `Placement` says.

Every rank runs the program's other ops on the whole batch (they are replicated), and each MoE
op, as torchtitan's expert parallelism dispatches and combines:

1. routes every token (the router is replicated, so every rank routes alike), and takes its
   share of the tokens, a contiguous slice by rank;
2. sends each of its (token, expert) pairs to a rank that holds the expert (a replicated
   expert's pairs alternate over its replicas by token), exchanging the per-rank counts first,
   then the rows, with ``all_to_all_single`` (uneven splits);
3. runs the experts it holds on the rows it received, with the block's experts kernel;
4. sends the outputs back the same way, adds them into its share with the gates, and gathers
   every rank's share, so each rank again holds the whole batch.

A rank keeps the program's other weights and only the experts its slots name.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import fx, nn

from moec.errors import ArtifactError, MoecError, UsageError
from moec.ir.moe_op import experts_kernel, moe_eager
from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import EXPERT_WEIGHTS, MoEWeights
from moec.ir.program import is_moe_node, node_args
from moec.runtime.graph_edits import attribute, call_module_instead
from moec.runtime.manifest import Manifest
from moec.runtime.placement import BlockPlacement, Placement

__all__ = [
    "ExpertParallelMoE",
    "ShardReport",
    "distributed_world",
    "init_from_env",
    "leave",
    "shard_program",
]

DEFAULT_TIMEOUT_S = 120


def init_from_env() -> bool:
    """Join the torch.distributed group torchrun describes (``WORLD_SIZE`` and friends), gloo
    on CPU and NCCL with CUDA, if there is one and it is not joined yet; True when joined.
    ``MOEC_TIMEOUT_S`` bounds how long a rank waits for the others (a rank that died)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    timeout = datetime.timedelta(seconds=float(os.environ.get("MOEC_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # each rank on its own GPU of the node
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"rank {os.environ.get('RANK')} is local rank {local}, and this node has "
                f"{torch.cuda.device_count()} CUDA devices: start at most that many ranks per node"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def leave() -> None:
    """Wait for every rank, then leave the group (a process that exits with its group still
    up may be stopped by the backend's threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the joined group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class ShardReport:
    blocks: int = 0
    device_expert_bytes: dict[int, int] = field(default_factory=dict)  # experts per local device
    other_bytes: int = 0  # everything else this process holds (replicated)

    @property
    def expert_bytes(self) -> int:
        """The experts this process holds."""
        return sum(self.device_expert_bytes.values())


class ExpertParallelMoE(nn.Module):
    """One MoE block over the group: ``forward(x, routed_ids, routed_weights) -> (out,
    chosen)``, the results of ``torch.ops.moec.moe`` on the whole batch."""

    def __init__(self, spec: MoESpec, weights: MoEWeights, placed: BlockPlacement, group=None):
        super().__init__()
        self.spec, self.group = spec, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if placed.devices != self.world:
            raise ArtifactError(
                f"the placement puts block {placed.block or '(model)'} on {placed.devices} "
                f"devices, the job has {self.world} ranks; place the artifact for {self.world}"
            )
        self.placed = placed
        self.routing = dataclasses.replace(weights, **dict.fromkeys(EXPERT_WEIGHTS))
        self._hold(weights)

    def _hold(self, weights: MoEWeights) -> None:
        """Keep this rank's slots of the stacked expert weights, and the replica tables."""
        self.device = expert_device(weights)
        self.local = slot_weights(weights, self.placed.slots[self.rank], self.device)
        self.replicas, self.holder_rank, self.holder_slot = holder_tables(self.placed, self.device)

    def held(self) -> list[MoEWeights]:
        """The expert weights this rank holds (one device)."""
        return [self.local]

    def move_to(self, placed: BlockPlacement) -> int:
        """Take ``placed`` as this block's placement while the job runs: each expert a rank
        newly holds comes from the first rank that held it (every rank calls this at the same
        point). Returns how many expert replicas moved over the whole group."""
        before = self.placed
        names = [n for n in EXPERT_WEIGHTS if getattr(self.local, n) is not None]
        sizes = [getattr(self.local, n)[0].numel() for n in names]
        have = {e: s for s, e in enumerate(before.slots[self.rank])}
        received: dict[int, torch.Tensor] = {}
        requests, moves = [], 0
        for device, experts in enumerate(placed.slots):
            for expert in sorted(set(experts) - set(before.slots[device])):
                moves += experts.count(expert)
                sender = before.holders(expert)[0][0]
                if self.rank == sender:
                    parts = [getattr(self.local, n)[have[expert]].reshape(-1) for n in names]
                    requests.append(dist.isend(torch.cat(parts), device, group=self.group))
                if self.rank == device:
                    received[expert] = getattr(self.local, names[0]).new_empty(sum(sizes))
                    requests.append(dist.irecv(received[expert], sender, group=self.group))
        try:
            for request in requests:
                request.wait()
        except RuntimeError as e:
            raise MoecError(
                f"rank {self.rank}: moving experts of block {before.block or '(model)'} failed "
                f"({str(e).splitlines()[0][:200]}); another rank has stopped"
            ) from e
        tensors = {}
        for index, n in enumerate(names):
            stacked, offset = getattr(self.local, n), sum(sizes[:index])
            rows = [
                stacked[have[e]]
                if e in have
                else received[e][offset : offset + sizes[index]].reshape(stacked.shape[1:])
                for e in placed.slots[self.rank]
            ]
            tensors[n] = torch.stack(rows)
        self.local = dataclasses.replace(self.local, **tensors)
        self.placed = placed
        self.replicas, self.holder_rank, self.holder_slot = holder_tables(placed, self.device)
        return moves

    def forward(self, x, routed_ids=None, routed_weights=None):
        return moe_eager(
            self.spec, self.routing, x, routed_ids, routed_weights, experts=self._dispatch
        )

    def _dispatch(self, out, x, tokens, counts, gates):
        """`moe_eager`'s experts step over the group (module docstring)."""
        total = x.shape[0]
        lo = total * self.rank // self.world
        hi = total * (self.rank + 1) // self.world
        expert = pair_experts(counts, tokens.device)
        mine = (tokens >= lo) & (tokens < hi)
        token, expert, gate = tokens[mine], expert[mine], gates[mine]
        which = token % self.replicas[expert]
        dest, slot = self.holder_rank[expert, which], self.holder_slot[expert, which]
        order = torch.argsort(dest, stable=True)
        token, gate, dest, slot = token[order], gate[order], dest[order], slot[order]
        send = torch.bincount(dest, minlength=self.world)
        recv = torch.empty_like(send)
        self._collective(dist.all_to_all_single, recv, send)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        rows = x.index_select(0, token)
        got_rows = x.new_empty((sum(recv_splits), x.shape[1]))
        got_slot = slot.new_empty(sum(recv_splits))
        self._collective(dist.all_to_all_single, got_rows, rows, recv_splits, send_splits)
        self._collective(dist.all_to_all_single, got_slot, slot, recv_splits, send_splits)
        local = torch.argsort(got_slot, stable=True)
        local_counts = torch.bincount(got_slot, minlength=len(self.placed.slots[self.rank]))
        kernel = experts_kernel(self.spec.lowering)
        computed = kernel(self.spec, self.local, got_rows[local], local_counts.tolist())
        results = torch.empty_like(computed)
        results[local] = computed
        back = x.new_empty((len(token), x.shape[1]))
        self._collective(dist.all_to_all_single, back, results, send_splits, recv_splits)
        out.index_add_(0, token, back * gate.unsqueeze(-1))
        return self._gather_shares(out, total)

    def _gather_shares(self, out: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's share of ``out`` on every rank (shares padded to one size)."""
        bounds = [total * r // self.world for r in range(self.world + 1)]
        spans = list(itertools.pairwise(bounds))
        share = out.new_zeros((max(b - a for a, b in spans), out.shape[1]))
        lo, hi = spans[self.rank]
        share[: hi - lo] = out[lo:hi]
        shares = [torch.empty_like(share) for _ in range(self.world)]
        self._collective(dist.all_gather, shares, share)
        return torch.cat([s[: b - a] for s, (a, b) in zip(shares, spans, strict=True)])

    def _collective(self, op, *args):
        try:
            op(*args, group=self.group)
        except RuntimeError as e:  # gloo and NCCL report a lost peer or a timeout this way
            raise MoecError(
                f"rank {self.rank} of {self.world}: a collective in block "
                f"{self.placed.block or '(model)'} failed ({str(e).splitlines()[0][:200]}); "
                "another rank has stopped or timed out (MOEC_TIMEOUT_S)"
            ) from e


def expert_device(weights: MoEWeights) -> torch.device:
    """The device of a block's stacked expert weights."""
    return next(t for _, t in weights.items() if t is not None).device


def slot_weights(weights: MoEWeights, slots, device: torch.device) -> MoEWeights:
    """The stacked expert weights of ``slots`` (logical expert ids, in slot order) on
    ``device``: a copy, so the full stack can go."""
    index = torch.as_tensor(list(slots), dtype=torch.long, device=expert_device(weights))
    return MoEWeights(
        router_weight=None,
        **{
            n: None if (t := getattr(weights, n)) is None else t.index_select(0, index).to(device)
            for n in EXPERT_WEIGHTS
        },
    )


def holder_tables(placed: BlockPlacement, device: torch.device):
    """[E] replicas per expert, and [E, most replicas] the device and the slot of each replica
    (zero past an expert's own replicas), on ``device``."""
    most = int(placed.replicas.max())
    rank = torch.zeros((placed.experts, most), dtype=torch.long)
    slot = torch.zeros((placed.experts, most), dtype=torch.long)
    for e in range(placed.experts):
        for i, (d, s) in enumerate(placed.holders(e)):
            rank[e, i], slot[e, i] = d, s
    replicas = torch.as_tensor(placed.replicas, dtype=torch.long)
    return replicas.to(device), rank.to(device), slot.to(device)


def pair_experts(counts: list[int], device: torch.device) -> torch.Tensor:
    """[P] the expert of each (token, expert) pair, from the pairs' per-expert ``counts``."""
    return torch.repeat_interleave(
        torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
    )


def shard_program(
    module: fx.GraphModule, manifest: Manifest, placement: Placement, make=None
) -> ShardReport:
    """Put a sharded block in place of every ``moec::moe`` node of a loaded program
    (``ExportedProgram.module()``) and drop the expert weights it does not hold. ``make(spec,
    weights, block_placement)`` builds the block (an `ExpertParallelMoE` on the default group
    by default; `moec.runtime.device_experts` makes one over the devices of one process)."""
    make = make or ExpertParallelMoE
    blocks = _node_blocks(module, manifest)
    placement.check_artifact(
        {name: b["experts"] for b in manifest.blocks if (name := b["name"]) in blocks.values()},
        manifest.files["model"].sha256,
    )
    report = ShardReport()
    held: set[int] = set()
    for index, (node, block) in enumerate(blocks.items()):
        args = node_args(node)
        tensors = {
            n: None if a is None else attribute(module, a.target) for n, a in args.weights.items()
        }
        sharded = make(args.spec, MoEWeights(**tensors), placement.block(block))
        inputs = (args.x, args.routed_ids, args.routed_weights)
        call_module_instead(
            module, node, f"moec_experts_{index}", sharded, inputs, args.weights.values()
        )
        report.blocks += 1
        for device, weights in enumerate(sharded.held()):
            size = sum(t.numel() * t.element_size() for _, t in weights.items())
            report.device_expert_bytes[device] = report.device_expert_bytes.get(device, 0) + size
            held.update(id(t) for _, t in weights.items())
    module.graph.lint()
    module.recompile()
    report.other_bytes = sum(
        t.numel() * t.element_size()
        for t in {id(t): t for t in (*module.parameters(), *module.buffers())}.values()
        if id(t) not in held
    )
    return report


def _node_blocks(module: fx.GraphModule, manifest: Manifest) -> dict[fx.Node, str]:
    """Each ``moec::moe`` node's block, by the routing output its mask feeds."""
    output = next(n for n in module.graph.nodes if n.op == "output")
    flat = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    position = {id(value): i for i, value in enumerate(flat)}
    found = {}
    for node in module.graph.nodes:
        if not is_moe_node(node):
            continue
        masks = [u for u in node.users if u.args[1:] == (1,) and id(u) in position]
        if len(masks) != 1:
            raise ArtifactError("a moec::moe node's routing is not an output of the program")
        found[node] = manifest.outputs[position[id(masks[0])]].block
    return found
