"""``compile``: load -> capture -> passes -> lower -> write, with timings per stage."""

from __future__ import annotations

import functools
import logging
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

import moec
from moec.compiler.artifact_writer import check_destination, write_artifact
from moec.compiler.capture import CapturedBlock, CapturedProgram, capture
from moec.compiler.lower_onnx import lower_to_onnx
from moec.compiler.sources import LoadedSource, load_source, source_from_module
from moec.errors import MoecError, TargetNotBuiltError
from moec.models import ModelSource
from moec.models.hf_models import hf_model_source, is_hf_model
from moec.passes import (
    CALIBRATION_SCHEDULE,
    Pass,
    PassManager,
    check_capacity,
    check_lowering,
    default_passes,
)
from moec.passes.calibration import load_calibration
from moec.passes.compress import CompressionResult, compress_model
from moec.runtime.inputs import make_inputs
from moec.runtime.manifest import Manifest

__all__ = ["DEFAULT_TOLERANCES", "STAGES", "TARGETS", "CompileResult", "compile_model"]

log = logging.getLogger(__name__)

TARGETS = ("ort", "onnx", "trt", "torch")
STAGES = ("load", "compress", "capture", "passes", "lower", "write")
DEFAULT_TOLERANCES = {"rel_l2": 1e-5, "routing_agreement": 0.999}
MODEL_FILE = "model.onnx"
PT2_FILE = "model.pt2"
WEIGHTS_FILE = "model.onnx.data"


@dataclass
class CompileResult:
    """A written artifact and how it was made."""

    path: Path
    manifest: Manifest
    blocks: list[CapturedBlock]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(f.bytes for f in self.manifest.files.values())

    def load(self):
        from moec.runtime.load import load

        return load(self.path)


StageCallback = Callable[[str], None]


def compile_model(
    model: nn.Module | str,
    example_inputs: Sequence[Any] | None = None,
    *,
    target: str = "ort",
    output: str | Path | None = None,
    passes: list[Pass] | None = None,
    lowering: str | None = None,
    capacity: float | str | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
    lossy: list[Pass] | None = None,
    calib: str | Path | None = None,
    calib_samples: int | None = None,
    force: bool = False,
    trust_pickle: bool = False,
    on_stage: StageCallback | None = None,
    **source_options: Any,
) -> CompileResult:
    """Compile ``model`` (an nn.Module with ``example_inputs``, or a SRC string) for ``target``.

    ``output``: the artifact directory (default: a new temporary directory). ``passes``: the
    pass pipeline (default: `default_passes(target, lowering, capacity, calibration)`; the
    calibration inputs default to seeded random inputs of the model's declared shapes).
    ``lossy``: lossy passes (merge, prune, distil) run on the eager model before capture, driven
    by the calibration file ``calib`` (see `moec.passes.calibration`; ``calib_samples`` rows at
    most); their quality report goes into the manifest. ``source_options``: further
    `ModelSource` fields for an nn.Module (input_names, output_names, dynamic_shapes,
    input_ranges) or ``example_inputs_file`` (a .npz) for a pickled bare module.
    """
    _check_target(target)
    if lowering is not None:
        check_lowering(target, lowering)
    if capacity is not None:
        check_capacity(capacity)
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="moec-")) / "out"
    check_destination(out, force)
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        if on_stage is not None:
            on_stage(name)
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start

    with stage("load"):
        loaded = _load(model, example_inputs, trust_pickle, source_options)
    compression = None
    if lossy:
        if calib is None:
            names = ", ".join(p.name for p in lossy)
            raise MoecError(f"{names} need calibration data: give --calib FILE")
        with stage("compress"):
            data = load_calibration(calib, loaded.model_source, calib_samples)
            compression = compress_model(loaded.model_source, lossy, data)
    with stage("capture"):
        captured = capture(compression.source if compression else loaded.model_source)
    with stage("passes"):
        if passes is None:
            wants_capacity = capacity is not None or lowering == "capacity"
            if calibration is None and wants_capacity:
                calibration = make_inputs(captured.inputs, CALIBRATION_SCHEDULE, seed=1)
            passes = default_passes(target, lowering, capacity, calibration)
        captured, pass_records = PassManager(passes).run(captured)
    with stage("lower"):
        if target == "torch":
            files = functools.partial(_write_pt2, captured)
        else:
            files = functools.partial(_write_onnx, lower_to_onnx(captured, target))
        if compression is not None:
            files = functools.partial(_with_compressed, files, compression)
    with stage("write"):
        manifest = Manifest(
            target=target,
            source=loaded.record,
            inputs=captured.inputs,
            outputs=captured.outputs,
            files={},
            blocks=[_block_record(b) for b in captured.blocks],
            passes=(compression.records if compression else []) + pass_records,
            compression=compression.manifest_section() if compression else {},
            tolerances=dict(DEFAULT_TOLERANCES),
            versions=_versions(),
            notes=captured.notes,
        )
        path = write_artifact(out, manifest, files, force)
    log.info("compiled %s for %s into %s", loaded.record["spec"], target, path)
    return CompileResult(path, manifest, captured.blocks, timings, captured.notes)


def _check_target(target: str) -> None:
    if target == "trt":
        raise TargetNotBuiltError(
            "--target trt is not built in this version of moec; compile --target onnx and build "
            "the engine on the deployment machine with TensorRT (trtexec --onnx=OUT/model.onnx)"
        )
    if target not in TARGETS:
        raise MoecError(f"unknown target {target!r}; choose one of {TARGETS}")


def _load(model, example_inputs, trust_pickle: bool, options: dict[str, Any]) -> LoadedSource:
    if isinstance(model, str):
        return load_source(model, trust_pickle=trust_pickle, **options)
    if not isinstance(model, nn.Module):
        raise MoecError(f"moec.compile takes an nn.Module or a SRC string, not {type(model)}")
    if is_hf_model(model) and example_inputs is None:
        return source_from_module(hf_model_source(model.eval()))
    if example_inputs is None:
        raise MoecError("moec.compile(model, example_inputs): example_inputs are required")
    inputs = (
        tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    )
    return source_from_module(ModelSource(model.eval(), inputs, **options))


def _block_record(block: CapturedBlock) -> dict[str, Any]:
    return {
        "name": block.name,
        "class": block.class_name,
        "adapter": block.adapter,
        "summary": block.summary,
        "lowering": block.lowering,
        "reason": block.reason,
    }


def _with_compressed(write, compression: CompressionResult, directory: Path) -> dict[str, str]:
    files = write(directory)
    files["compressed"] = compression.write_tensors(directory)
    return files


def _write_pt2(captured: CapturedProgram, directory: Path) -> dict[str, str]:
    """The program itself: its moec::moe nodes run moec's kernel wherever moec.ir is imported.

    A family that stacks gate and up as one ``gate_up_proj`` hands moec's op two views of it:
    torch.export.save writes their storage once (no copy, as it should) and warns that no one
    view covers it, a warning about its own bookkeeping that says nothing of the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No complete tensor found in the group", UserWarning)
        torch.export.save(captured.program, directory / PT2_FILE)
    return {"model": PT2_FILE}


def _write_onnx(model: ir.Model, directory: Path) -> dict[str, str]:
    ir.save(model, directory / MODEL_FILE, external_data=WEIGHTS_FILE)
    files = {"model": MODEL_FILE}
    if (directory / WEIGHTS_FILE).exists():
        files["weights"] = WEIGHTS_FILE
    return files


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {
        "moec": moec.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
