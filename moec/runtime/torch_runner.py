"""`TorchRunner`: runs ``torch`` artifacts, a ``model.pt2`` ExportedProgram whose MoE blocks are
``moec::moe`` nodes executed by moec's kernel (importing `moec.ir` registers the op).

On activation the program's GEMM weights (MoE experts, linear layers) are packed once for
oneDNN (`pack_weights`); ``pack=False`` runs the stored program's ops and weights as they are
(either way without its per-call pytree code: `prepare_program`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import moec.ir.moe_op  # noqa: F401  (registers torch.ops.moec.moe, which the program calls)
from moec.errors import ArtifactError
from moec.runtime.arrays import to_numpy, to_torch
from moec.runtime.manifest import Manifest
from moec.runtime.runner import Runner
from moec.runtime.safe_pt2 import load_pt2
from moec.runtime.weight_packing import PackingReport, pack_weights

__all__ = ["TorchRunner", "prepare_program"]


class TorchRunner(Runner):
    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
        threads: int | None = None,
        pack: bool = True,
        trust_pickle: bool = False,
    ):
        super().__init__(manifest, directory, trust_pickle)
        self.threads, self.pack = threads, pack
        self.output_names = [spec.name for spec in manifest.outputs]
        self.module = None
        self.packing = PackingReport()

    def activate_impl(self) -> None:
        path = self.directory / self.manifest.files["model"].path
        program = load_pt2(path, trust_pickle=self.trust_pickle, error=ArtifactError, what="model")
        self.module = program.module()
        if self.threads is not None:  # first: packing measures GEMMs with these threads
            torch.set_num_threads(self.threads)
        self.packing = prepare_program(self.module, self.pack)

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [to_torch(feeds[name]) for name in self.input_names]
        with torch.no_grad():  # forward: the program's hooks have nothing to do (prepare_program)
            values = self.module.forward(*args)
        values = values if isinstance(values, (tuple, list)) else (values,)
        return {name: to_numpy(v) for name, v in zip(self.output_names, values, strict=True)}

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
