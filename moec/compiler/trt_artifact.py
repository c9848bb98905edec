"""The ``trt`` target's last step, and ``moec build-engine``.

A ``trt`` artifact is the portable ONNX (written as the ``onnx`` target writes it, lowered
with no TopK over the routed pairs) that `check_trt` passed, the engine's build settings in
the manifest's ``build`` section (precision, the profile's dim ranges and input shapes), and,
where TensorRT and a GPU are, ``model.plan`` with the TensorRT version and GPU it is tied to.
Elsewhere the artifact is complete without the engine, and ``moec build-engine OUT`` adds it
on the deployment machine: the plan and the manifest are each written beside their final
name and renamed into place, the manifest last.
"""

from __future__ import annotations

import os
from pathlib import Path

from moec import registry
from moec.compiler.trt_check import TrtProblem, check_trt, op_table
from moec.compiler.trt_engine import build_engine, timing_cache_path
from moec.compiler.trt_profiles import input_shapes, profile_dims
from moec.errors import LoweringError, SettingsError, UsageError
from moec.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest, file_sha256
from moec.runtime.tensorrt_env import engine_record, tensorrt_missing
from moec.settings import CompileSettings

__all__ = ["build_engine_in_place", "describe_problems", "finish_trt"]

ENGINE_ROLE = "engine"


def finish_trt(
    manifest: Manifest, directory: Path, files: dict[str, str], destination: Path
) -> dict[str, str]:
    """Check the written ONNX against TensorRT's support (refusing the compile with every
    node it would not take), record the engine's build settings, and build the engine when
    this machine can; else say, in the notes, how to finish."""
    settings = CompileSettings.from_dict(manifest.settings)
    dims = profile_dims(manifest.inputs, settings.trt_shapes)
    blocks = [b.get("name") or "" for b in manifest.blocks]
    problems = check_trt(directory / files["model"], blocks, {n: r[2] for n, r in dims.items()})
    if problems:
        raise LoweringError(describe_problems(problems, "the compiled ONNX"))
    table = op_table()
    manifest.build = {
        "checked_against": f"TensorRT {table.tensorrt} ONNX operator support ({table.source})",
        "precision": settings.dtype,
        "dims": dims,
        "inputs": input_shapes(manifest.inputs, dims),
    }
    why = tensorrt_missing()
    if why is not None:
        manifest.notes.append(
            f"no TensorRT engine yet ({why}); on the deployment machine run: moec build-engine "
            f"{destination}"
        )
        return files
    return {**files, ENGINE_ROLE: _write_engine(manifest, directory, files["model"])}


def describe_problems(problems: list[TrtProblem], what: str) -> str:
    table = op_table()
    lines = [f"{p.node} ({p.op}) in {p.block}: {p.reason}" for p in problems]
    return (
        f"{what} has {len(problems)} node(s) TensorRT {table.tensorrt}'s ONNX parser would not "
        "take:\n  " + "\n  ".join(lines)
    )


def _write_engine(manifest: Manifest, directory: Path, model_file: str) -> str:
    """Build the engine into ``directory`` (beside its final name, then renamed) and record
    what it is tied to; the engine's file name."""
    _check_precision(manifest.build["precision"])
    plan = build_engine(directory / model_file, manifest.build, timing_cache_path())
    name = registry.target(manifest.target).files[ENGINE_ROLE]
    partial = directory / f".{name}.partial"
    with open(partial, "wb") as f:
        f.write(plan)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, directory / name)
    record = engine_record()
    manifest.build["engine"] = record
    manifest.versions["tensorrt"] = record["tensorrt"]
    return name


def _check_precision(precision: str) -> None:
    import torch

    capability = torch.cuda.get_device_capability()
    if precision == "bf16" and capability < (8, 0):
        raise SettingsError(
            f"--precision bf16: this GPU (compute capability {capability[0]}.{capability[1]}) "
            "has no bfloat16; compile with --precision fp16"
        )


def build_engine_in_place(out: Path) -> Manifest:
    """``moec build-engine OUT``: build (or rebuild) the engine of the trt artifact ``out`` on
    this machine and record it in its manifest; the updated manifest."""
    out = Path(out)
    manifest = Manifest.read(out, skip_roles=(ENGINE_ROLE,))
    target = registry.target(manifest.target)
    if target.finish is None or ENGINE_ROLE not in target.files:
        raise UsageError(
            f"moec build-engine builds TensorRT engines; {out} is a {manifest.target!r} "
            "artifact: compile it with --target trt"
        )
    if not manifest.build.get("inputs"):
        raise UsageError(f"{out}'s manifest has no TensorRT build settings; compile it again")
    why = tensorrt_missing()
    if why is not None:
        raise UsageError(f"moec build-engine needs TensorRT and a GPU here: {why}")
    name = _write_engine(manifest, out, manifest.files["model"].path)
    path = out / name
    manifest.files[ENGINE_ROLE] = FileEntry(name, path.stat().st_size, file_sha256(path))
    manifest.notes = [n for n in manifest.notes if "moec build-engine" not in n]
    partial = out / f".{MANIFEST_NAME}.partial"
    partial.write_text(manifest.to_json())
    os.replace(partial, out / MANIFEST_NAME)
    return manifest
