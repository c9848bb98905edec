"""Running the lossy passes, and keeping their result in the artifact.

`compress_model` runs the lossy passes on a `CompressionState` and measures the quality report.
The compressed blocks (spec + tensors) are stored in the artifact (``compressed.safetensors``,
specs in the manifest's ``compression`` section), so that `apply_compressed` can rebuild the
model the passes produced from the recorded source: that model is what ``moec verify`` checks a
lossy artifact against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moec.compiler.moe_block import MoEBlock, op_block
from moec.errors import ArtifactError, MoecError
from moec.ir import WEIGHT_NAMES, MoESpec, MoEWeights
from moec.models import ModelSource
from moec.models.dense_ffn import DenseFFN
from moec.models.quantized_linear import QuantizedLinear
from moec.passes.calibration import CalibrationData
from moec.passes.compression_state import CompressionState
from moec.passes.pass_base import Pass, PassManager
from moec.passes.quality import quality_report

__all__ = ["COMPRESSED_FILE", "CompressionResult", "apply_compressed", "compress_model"]

COMPRESSED_FILE = "compressed.safetensors"
PARAMETERS = "<parameters>"


@dataclass
class CompressionResult:
    source: ModelSource  # the compressed model, ready to capture
    records: list[dict[str, Any]]  # one per pass, as PassManager writes them
    quality: dict[str, Any]
    blocks: dict[str, nn.Module]
    skipped: dict[str, str]
    calibration: dict[str, Any]
    parameters: dict[str, torch.Tensor]  # weights outside the blocks that a pass changed

    def manifest_section(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration,
            "quality": self.quality,
            "skipped": self.skipped,
            "blocks": [_block_record(name, module) for name, module in self.blocks.items()],
            "parameters": sorted(self.parameters),
        }

    def write_tensors(self, directory: Path) -> str:
        tensors = {f"{PARAMETERS}::{n}": t.contiguous() for n, t in self.parameters.items()}
        for name, module in self.blocks.items():
            for tensor_name, tensor in module.state_dict().items():
                tensors[f"{_key(name)}::{tensor_name}"] = tensor.contiguous()
        save_file(tensors, directory / COMPRESSED_FILE)
        return COMPRESSED_FILE


def compress_model(
    source: ModelSource, passes: list[Pass], calibration: CalibrationData
) -> CompressionResult:
    for p in passes:
        if not p.lossy:
            raise MoecError(f"pass {p.name} is not a lossy pass; it runs after capture")
    state = CompressionState(source, calibration)
    if not state.blocks and all(getattr(p, "needs_moe_blocks", True) for p in passes):
        why = "".join(f"; {name}: {reason}" for name, reason in state.skipped.items())
        raise MoecError(
            f"the lossy passes need MoE blocks with FFN experts, and this model has none{why}"
        )
    state, records = PassManager(passes).run(state)
    return CompressionResult(
        state.source,
        records,
        quality_report(state),
        dict(state.blocks),
        state.skipped,
        calibration.summary(),
        _changed_parameters(state),
    )


def _changed_parameters(state: CompressionState) -> dict[str, torch.Tensor]:
    """The model's tensors outside its blocks that differ from the model before the passes."""
    if "" in state.blocks:  # the model is one block: nothing outside it
        return {}
    before = state.reference.state_dict()
    prefixes = tuple(f"{name}." for name in state.blocks)
    return {
        name: tensor.detach()
        for name, tensor in state.model.state_dict().items()
        if not name.startswith(prefixes)
        and name in before
        and not torch.equal(tensor, before[name])
    }


def apply_compressed(model: nn.Module, section: dict[str, Any], directory: Path) -> nn.Module:
    """A copy of ``model`` with the blocks the passes produced put in place."""
    if not (directory / COMPRESSED_FILE).exists():
        raise ArtifactError(
            f"{directory} has no {COMPRESSED_FILE}: a lossy artifact runs without it, but "
            "verify needs it to rebuild the model its passes produced; verify the artifact "
            "as compiled (before the file was left out), or compile it again"
        )
    try:
        tensors = load_file(directory / COMPRESSED_FILE)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(
            f"{directory}: cannot read {COMPRESSED_FILE} ({e}); compile the artifact again"
        ) from e
    by_block: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        block, _, tensor_name = key.partition("::")
        by_block.setdefault(block, {})[tensor_name] = tensor
    root = copy.deepcopy(model)
    for record in section.get("blocks", []):
        name = record["name"]
        module = _rebuild(record, by_block.get(_key(name), {}))
        if name == "":
            root = module
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name), attr, module)
    changed = by_block.get(PARAMETERS, {})
    unknown = set(changed) - set(root.state_dict())
    if unknown or set(changed) != set(section.get("parameters", [])):
        raise ArtifactError(
            f"{directory}: {COMPRESSED_FILE} does not match the manifest's compression section "
            f"(parameters {sorted(unknown or changed)[:3]}...); compile the artifact again"
        )
    root.load_state_dict(changed, strict=False)
    return root


def _key(name: str) -> str:
    return name or "<model>"


def _block_record(name: str, module: nn.Module) -> dict[str, Any]:
    if isinstance(module, MoEBlock):
        return {"name": name, "kind": "moe", "spec": module.spec.to_dict()}
    if isinstance(module, DenseFFN):
        return {"name": name, "kind": "dense", "spec": module.spec.to_dict()}
    if isinstance(module, QuantizedLinear):
        return {"name": name, "kind": "linear", **module.record()}
    raise TypeError(f"no record for a compressed block of type {type(module).__name__}")


def _rebuild(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    kind = record.get("kind")
    if kind in ("moe", "dense"):
        spec = MoESpec.from_dict(record["spec"])
        weights = MoEWeights(**{n: tensors.get(n) for n in WEIGHT_NAMES})
        return op_block(spec, weights) if kind == "moe" else DenseFFN(spec, weights)
    if kind == "linear":
        return QuantizedLinear(
            tensors["codes"],
            tensors["scale"],
            tensors.get("zero"),
            tensors.get("bias"),
            record["bits"],
        )
    raise ArtifactError(
        f"compressed block {record.get('name')!r} of unknown kind {record.get('kind')!r}"
    )
