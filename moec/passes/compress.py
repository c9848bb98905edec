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
from safetensors.torch import load_file, save_file
from torch import nn

from moec.compiler.moe_block import MoEBlock, op_block
from moec.errors import ArtifactError, MoecError
from moec.ir import WEIGHT_NAMES, MoESpec, MoEWeights
from moec.models import ModelSource
from moec.models.dense_ffn import DenseFFN
from moec.passes.calibration import CalibrationData
from moec.passes.compression_state import CompressionState
from moec.passes.pass_base import Pass, PassManager
from moec.passes.quality import quality_report

__all__ = ["COMPRESSED_FILE", "CompressionResult", "apply_compressed", "compress_model"]

COMPRESSED_FILE = "compressed.safetensors"


@dataclass
class CompressionResult:
    source: ModelSource  # the compressed model, ready to capture
    records: list[dict[str, Any]]  # one per pass, as PassManager writes them
    quality: dict[str, Any]
    blocks: dict[str, nn.Module]
    skipped: dict[str, str]
    calibration: dict[str, Any]

    def manifest_section(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration,
            "quality": self.quality,
            "skipped": self.skipped,
            "blocks": [_block_record(name, module) for name, module in self.blocks.items()],
        }

    def write_tensors(self, directory: Path) -> str:
        tensors = {}
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
    if not state.blocks:
        raise MoecError(
            "the lossy passes need MoE blocks with FFN experts, and this model has none"
            + (
                f" ({', '.join(state.skipped)}: {next(iter(state.skipped.values()))})"
                if state.skipped
                else ""
            )
        )
    state, records = PassManager(passes).run(state)
    return CompressionResult(
        state.source,
        records,
        quality_report(state),
        dict(state.blocks),
        state.skipped,
        calibration.summary(),
    )


def apply_compressed(model: nn.Module, section: dict[str, Any], directory: Path) -> nn.Module:
    """A copy of ``model`` with the blocks the passes produced put in place."""
    try:
        tensors = load_file(directory / COMPRESSED_FILE)
    except (OSError, RuntimeError) as e:
        raise ArtifactError(f"{directory}: cannot read {COMPRESSED_FILE} ({e})") from e
    root = copy.deepcopy(model)
    for record in section.get("blocks", []):
        name = record["name"]
        module = _rebuild(
            record,
            {
                k.split("::", 1)[1]: v
                for k, v in tensors.items()
                if k.split("::", 1)[0] == _key(name)
            },
        )
        if name == "":
            root = module
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name), attr, module)
    return root


def _key(name: str) -> str:
    return name or "<model>"


def _block_record(name: str, module: nn.Module) -> dict[str, Any]:
    if isinstance(module, MoEBlock):
        return {"name": name, "kind": "moe", "spec": module.spec.to_dict()}
    if isinstance(module, DenseFFN):
        return {"name": name, "kind": "dense", "spec": module.spec.to_dict()}
    raise TypeError(f"no record for a compressed block of type {type(module).__name__}")


def _rebuild(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    kind = record.get("kind")
    if kind in ("moe", "dense"):
        spec = MoESpec.from_dict(record["spec"])
        weights = MoEWeights(**{n: tensors.get(n) for n in WEIGHT_NAMES})
        return op_block(spec, weights) if kind == "moe" else DenseFFN(spec, weights)
    raise ArtifactError(
        f"compressed block {record.get('name')!r} of unknown kind {record.get('kind')!r}"
    )
