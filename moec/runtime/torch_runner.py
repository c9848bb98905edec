"""`TorchRunner`: runs ``torch`` artifacts, a ``model.pt2`` ExportedProgram whose MoE blocks are
``moec::moe`` nodes executed by moec's kernel (importing `moec.ir` registers the op).

On activation the program's GEMM weights (MoE experts, linear layers) are packed once for
oneDNN on the CPU (`pack_weights`); ``pack=False`` runs the stored program's ops and weights
as they are (either way without its per-call pytree code: `prepare_program`).

In a torch.distributed job of several ranks (``torchrun``), the MoE blocks run expert-parallel
by the artifact's placement (`moec.runtime.expert_parallel`), each rank holding only its
experts; ``devices=[...]`` spreads them over the devices of one process the same way
(`moec.runtime.device_experts`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.export.passes import move_to_device_pass

import moec.ir.dequantize_op
import moec.ir.moe_op  # noqa: F401  (registers torch.ops.moec.moe, which the program calls)
from moec.errors import ArtifactError, UsageError
from moec.runtime.arrays import to_numpy, to_torch
from moec.runtime.device_experts import ExpertsOverDevices, check_devices
from moec.runtime.expert_parallel import (
    ExpertParallelMoE,
    ShardReport,
    distributed_world,
    shard_program,
)
from moec.runtime.manifest import Manifest
from moec.runtime.placement import Placement
from moec.runtime.runner import Runner
from moec.runtime.safe_pt2 import load_pt2
from moec.runtime.torch_decode_steps import TorchDecodeSteps
from moec.runtime.weight_packing import PackingReport, pack_weights

__all__ = ["TorchRunner", "prepare_program"]


class TorchRunner(Runner):
    """Runs a ``torch`` artifact's program. ``devices``: where it runs (default the CPU, and
    ``cuda:LOCAL_RANK`` in an NCCL job); several devices spread its experts over them by the
    artifact's placement (`moec.runtime.device_experts`), the rest running on the first."""

    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
        threads: int | None = None,
        pack: bool = True,
        trust_pickle: bool = False,
        devices: Sequence[str] | None = None,
    ):
        super().__init__(manifest, directory, trust_pickle)
        self.threads, self.pack = threads, pack
        self.devices = None if devices is None else check_devices(devices)
        self.output_names = [spec.name for spec in manifest.outputs]
        self.module = None
        self.packing = PackingReport()
        self.sharding: ShardReport | None = None

    def activate_impl(self) -> None:
        _, world = distributed_world()
        devices = self._job_devices(world)
        path = self.directory / self.manifest.files["model"].path
        program = load_pt2(path, trust_pickle=self.trust_pickle, error=ArtifactError, what="model")
        if devices[0].type != "cpu":
            program = move_to_device_pass(program, devices[0])
        # A cache program's guards bound the mask by its parts' 0/1-specialisation floors
        # (total >= 4); the manifest's dims, checked on every call, are the real contract.
        self.module = program.module(check_guards=self.decoding is None)
        del program  # the weights this process does not hold go with it once sharded
        if self.threads is not None:  # first: packing measures GEMMs with these threads
            torch.set_num_threads(self.threads)
        if world > 1:
            self.sharding = shard_program(self.module, self.manifest, self.placement(world))
        elif len(devices) > 1:
            placement = self.placement(len(devices), "devices")
            make = functools.partial(ExpertsOverDevices, devices=devices)
            self.sharding = shard_program(self.module, self.manifest, placement, make)
        self.device = devices[0]
        self.packing = prepare_program(self.module, self.pack and self.device.type == "cpu")

    def _job_devices(self, world: int) -> list[torch.device]:
        if self.devices is None:
            if world > 1 and dist.get_backend() == "nccl":
                return [torch.device("cuda", torch.cuda.current_device())]
            return [torch.device("cpu")]
        if world > 1 and len(self.devices) > 1:
            raise UsageError(
                f"devices={[str(d) for d in self.devices]}: in a job of {world} ranks each rank "
                "runs on one device; give each rank its own, or none"
            )
        return self.devices

    def apply_placement(self, placement: Placement) -> int:
        """Run by ``placement`` from now on, without stopping: each rank (or device) receives
        only the experts it newly holds; in a job of several ranks every rank calls it at the
        same point between calls. Returns the expert replicas moved."""
        if self.sharding is None:
            raise UsageError(
                "apply_placement: the runner does not run expert-parallel (one rank, one "
                "device); there is no placement to change"
            )
        blocks = {m.placed.block: m.placed.experts for m in self._sharded()}
        placement.check_artifact(blocks, self.manifest.files["model"].sha256)
        if placement.devices != self._sharded()[0].placed.devices:
            raise UsageError(
                f"apply_placement: the placement is for {placement.devices} devices, the runner "
                f"runs on {self._sharded()[0].placed.devices}"
            )
        return sum(m.move_to(placement.block(m.placed.block)) for m in self._sharded())

    def _sharded(self) -> list[ExpertParallelMoE | ExpertsOverDevices]:
        return [
            m
            for m in self.module.modules()
            if isinstance(m, (ExpertParallelMoE, ExpertsOverDevices))
        ]

    def placement(self, count: int, unit: str = "ranks") -> Placement:
        """The artifact's placement, for ``count`` ranks or devices."""
        entry = self.manifest.files.get("placement")
        if entry is None:
            raise ArtifactError(
                f"{self.directory} runs on {count} {unit} but has no placement: run moec place "
                f"{self.directory} --devices {count} --calib FILE first"
            )
        placement = Placement.read(self.directory / entry.path)
        if placement.devices != count:
            raise ArtifactError(
                f"{self.directory} is placed on {placement.devices} devices, the job has {count} "
                f"{unit}; place it again with --devices {count}, or run on {placement.devices}"
            )
        return placement

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [to_torch(feeds[name]).to(self.device) for name in self.input_names]
        with torch.no_grad():  # forward: the program's hooks have nothing to do (prepare_program)
            values = self.module.forward(*args)
        values = values if isinstance(values, (tuple, list)) else (values,)
        return {name: to_numpy(v.cpu()) for name, v in zip(self.output_names, values, strict=True)}

    def decode_steps(self, batch: int, total: int):
        """Steps that append to the cache in place, in buffers allocated once
        (`TorchDecodeSteps`)."""
        self.activate()
        return TorchDecodeSteps(self, batch, total)

    def deactivate_impl(self) -> None:
        self.module = None


def prepare_program(module: torch.fx.GraphModule, pack: bool = True) -> PackingReport:
    """Ready a loaded program (``ExportedProgram.module()``) to run as `TorchRunner` runs it:
    weights packed (`pack_weights`) unless ``pack`` is false, and flat tensors in and out with no
    per-call pytree work.

    The runner hands the program a flat tuple of tensors in the manifest's order, checked
    against the manifest first (`check_feeds`), and reads a flat tuple of outputs. So the
    exported module's pre-hook that flattens the inputs again to compare pytree structures is
    switched off, and where the program takes and returns only flat tensors its pytree
    flattening and unflattening go too (`_flat_signature`): at one token these per-call costs
    are a visible share of a layer's time. The program's own shape guards (its _guards_fn node)
    still run. Its other hooks enter and leave graph inputs that are modules, which moec's
    programs never take, so the runner calls ``forward`` past them."""
    module.validate_inputs = False
    _flat_signature(module)
    return pack_weights(module) if pack else PackingReport()


def _flat_signature(module: torch.fx.GraphModule) -> None:
    """Generate ``module``'s code without pytree handling when its inputs are positional tensors
    and its output one tensor or a flat tuple of them (``forward`` then returns a tuple)."""
    codegen = module.graph._codegen
    if type(codegen) is not torch.fx.graph._PyTreeCodeGen:  # what ExportedProgram.module() has
        return
    info = codegen.pytree_info
    if info.in_spec is None or info.out_spec is None:
        return
    args, kwargs = info.in_spec.children()
    if kwargs.num_children == 0 and _flat(args) and _flat(info.out_spec):
        module.graph.set_codegen(torch.fx.graph.CodeGen())
        module.recompile()


def _flat(spec) -> bool:
    return spec.is_leaf() or (
        spec.type in (tuple, list) and all(c.is_leaf() for c in spec.children())
    )
