"""``compile``: load -> compress -> capture -> passes -> emit (lower to the target's files and
write the artifact), with timings per stage.

The one place that runs passes. Everything it does is decided by a `CompileSettings` (built
from the CLI's flags or ``moec.compile``'s keywords) and the registry's entry of its target.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import moec
from moec import registry
from moec.compiler.artifact_writer import claim, write_artifact
from moec.compiler.capture import NO_BLOCK_NOTE, OWN_OPS, capture, fake_probe
from moec.compiler.drop_routing import drop_routing_outputs
from moec.compiler.sources import LoadedSource, load_source, source_from_module
from moec.errors import CaptureError, LoweringError, MoecError, OutOfMemoryError
from moec.ir.program import BlockRecord, CapturedProgram
from moec.models import ModelSource
from moec.models.checkpoint import Checkpoint, has_safetensors
from moec.models.hf_models import hf_model_source, is_hf_model
from moec.models.kv_cache import with_kv_cache
from moec.models.lazy_weights import has_lazy_weights
from moec.passes import CALIBRATION_SCHEDULE, Pass, PassManager, default_passes, lossy_passes
from moec.passes.calibration import load_calibration
from moec.passes.compress import CompressionResult, compress_model
from moec.runtime.decoding import Decoding
from moec.runtime.inputs import make_inputs
from moec.runtime.manifest import Manifest
from moec.runtime.memory import available_memory
from moec.settings import FLAGS, CompileSettings

__all__ = ["STAGES", "CompileResult", "compile_model"]

log = logging.getLogger(__name__)

STAGES = ("load", "compress", "capture", "passes", "emit")
TOKENIZER_FILE = "tokenizer.json"
SOURCE_OPTIONS = (
    "input_names",
    "output_names",
    "dynamic_shapes",
    "input_ranges",
    "example_inputs_file",
)
SETTING_FLAGS = {f.name for f in FLAGS}

StageCallback = Callable[[str], None]
StepCallback = Callable[[int, int], None]


@dataclass
class CompileResult:
    """A written artifact and how it was made."""

    path: Path
    manifest: Manifest
    blocks: list[BlockRecord]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(f.bytes for f in self.manifest.files.values())

    @property
    def settings(self) -> CompileSettings:
        return CompileSettings.from_dict(self.manifest.settings)

    def load(self):
        from moec.runtime.load import load

        return load(self.path)


def compile_model(
    model: nn.Module | str,
    example_inputs: Sequence[Any] | None = None,
    *,
    settings: CompileSettings | None = None,
    output: str | Path | None = None,
    force: bool = False,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    passes: list[Pass] | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
    on_stage: StageCallback | None = None,
    on_step: StepCallback | None = None,
    **options: Any,
) -> CompileResult:
    """Compile ``model`` (an nn.Module with ``example_inputs``, or a SRC string).

    How: ``settings``, or its flags as keywords (``target="ort"``, ``lowering="gather"``,
    ``capacity=1.5``, ``merge_experts=0.5``, ``calib="ids.npy"``, ...: `CompileSettings`
    `.from_flags`). Where: ``output`` (default: a new temporary directory), replaced only with
    ``force``. ``trust_pickle``: allow SRC to be a pickle, or a .pt2 that needs unpickling
    (unpickling runs code); ``trust_remote_code``: allow an ``hf:`` SRC to run its own code.
    ``passes``: the post-capture pipeline instead of `default_passes`; ``calibration``: feeds
    for the capacity pass (default: seeded random inputs of the model's declared shapes).
    ``on_stage(name)``, ``on_step(step, steps)``: progress of the stages and of distillation.
    Further keywords are `ModelSource` fields for an nn.Module (input_names, output_names,
    dynamic_shapes, input_ranges) or ``example_inputs_file`` (a .npz) for a pickled bare module.
    """
    flags = {k: v for k, v in options.items() if k in SETTING_FLAGS}
    source_options = {k: v for k, v in options.items() if k not in SETTING_FLAGS}
    unknown = sorted(set(source_options) - set(SOURCE_OPTIONS))
    if unknown:
        raise TypeError(f"moec.compile() got unexpected keyword argument(s) {unknown}")
    if settings is None:
        settings = CompileSettings.from_flags(flags)
    elif flags:
        raise MoecError(f"give settings or their flags ({sorted(flags)}), not both")
    target = registry.target(settings.target)
    target.writer()  # an unavailable target fails before any work
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="moec-")) / "out"
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        if on_stage is not None:
            on_stage(name)
        start = time.perf_counter()
        try:
            yield
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            raise OutOfMemoryError(
                f"out of memory in the {name} stage ({_first_line(e)}); the compile needs more "
                "memory than this process may use: free memory, raise its limit (ulimit -v), "
                "or compile on a larger machine"
            ) from e
        timings[name] = time.perf_counter() - start

    with claim(out, force) as held:
        lossy = lossy_passes(settings)
        stream = _streams_weights(model, settings, target, bool(lossy) or passes is not None)
        if not stream:
            _check_fits_in_memory(model, settings, target, lossy, passes is not None)
        with stage("load"):
            trust = {"trust_pickle": trust_pickle, "trust_remote_code": trust_remote_code}
            dtype = getattr(torch, settings.dtype_name)
            as_stored = torch.float32 if lossy else dtype  # lossy passes work in float32
            loaded = _load(model, example_inputs, trust, source_options, stream, as_stored)
        compression = None
        if lossy:
            with stage("compress"):
                for p in lossy:
                    if on_step is not None and hasattr(p, "on_step"):
                        p.on_step = on_step
                data = load_calibration(settings.calib, loaded.model_source, settings.calib_samples)
                compression = compress_model(loaded.model_source, lossy, data)
        with stage("capture"):
            source = compression.source if compression else loaded.model_source
            captured, decoding = _capture(source, dtype, settings.kv_cache)
            if captured.lazy_weights:
                captured.notes.append(
                    "weights streamed from the checkpoint into the artifact, one tensor at a time"
                )
            if compression is not None and not captured.blocks:
                captured.notes = [n for n in captured.notes if n != NO_BLOCK_NOTE]
                captured.notes.append(
                    "the lossy passes left no MoE block: each was replaced by a dense FFN"
                )
        with stage("passes"):
            if passes is None:
                if calibration is None and settings.wants_capacity:
                    calibration = make_inputs(captured.inputs, CALIBRATION_SCHEDULE, seed=1)
                elif calibration is not None and decoding:  # fill the cache's inputs
                    cache = Decoding.from_manifest(decoding, captured.inputs, captured.outputs, "")
                    calibration = [cache.complete(feeds, captured.inputs) for feeds in calibration]
                passes = default_passes(settings, calibration)
            captured, pass_records = PassManager(passes).run(captured)
            if not settings.routing_outputs:
                captured = drop_routing_outputs(captured)
            _check_lowerings(captured, target)
        with stage("emit"), _naming_unconverted_blocks(captured.notes):
            manifest = Manifest(
                target=target.name,
                source=loaded.record,
                inputs=captured.inputs,
                outputs=captured.outputs,
                files={},
                blocks=[b.to_dict() for b in captured.block_records()],
                passes=(compression.records if compression else []) + pass_records,
                compression=compression.manifest_section() if compression else {},
                versions=_versions(),
                notes=captured.notes,
                settings=settings.to_dict(),
                decoding=decoding,
            )
            tokenizer = _tokenizer_file(loaded, decoding)
            writer = _writer(captured, target, manifest, held.out, compression, tokenizer)
            path = write_artifact(held, manifest, writer, force)
    log.info("compiled %s for %s into %s", loaded.record["spec"], target.name, path)
    return CompileResult(path, manifest, captured.block_records(), timings, captured.notes)


@contextmanager
def _naming_unconverted_blocks(notes: list[str]) -> Iterator[None]:
    """A lowering failure names the MoE-like blocks left as the model's own ops, and why."""
    try:
        yield
    except LoweringError as e:
        unconverted = [n for n in notes if n.endswith(OWN_OPS)]
        if not unconverted:
            raise
        raise LoweringError(f"{e}; not converted, and likely the cause: {unconverted[0]}") from e


OUT_OF_MEMORY = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory")


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (Python's, or one torch or a runtime raised)."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(words in text for words in OUT_OF_MEMORY)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _capture(
    source: ModelSource, dtype: torch.dtype, kv_cache: bool
) -> tuple[CapturedProgram, dict]:
    """The captured program, with the causal LM's KV cache as inputs and outputs where
    ``kv_cache`` and moec captures it (the manifest's ``decoding`` section), else without,
    saying why in the notes."""
    why = None
    if kv_cache:
        probe = fake_probe if has_lazy_weights(source.model) else nullcontext
        cached, decoding, why = with_kv_cache(source, probe)
        if cached is not None:
            try:
                return capture(cached, dtype), decoding
            except CaptureError as e:
                why = f"capture with the cache failed: {str(e)[:300]}"
    captured = capture(source, dtype)
    if why:
        captured.notes.append(f"compiled without a KV cache: {why}")
    return captured, {}


def _check_lowerings(program: CapturedProgram, target: registry.Target) -> None:
    """Every block's lowering is one ``target`` runs. A block no pass lowered (a custom
    ``passes`` list) gets the target's exact fallback."""
    allowed = registry.lowerings_for(target.name)
    for node in program.moe_nodes():
        lowering = program.spec(node).lowering
        if lowering is None:
            program.set_lowering(node, target.fallback, "no pass chose one: the exact fallback")
        elif lowering not in allowed:
            block = program.block_for(node)
            raise LoweringError(
                f"MoE block {block.name or '(model)'} has lowering {lowering}, which target "
                f"{target.name} cannot run; it can run: {', '.join(allowed)}"
            )


def _writer(
    program: CapturedProgram,
    target: registry.Target,
    manifest: Manifest,
    destination: Path,
    compression: CompressionResult | None,
    tokenizer: Path | None,
):
    """``write(directory) -> {role: file}`` for the artifact writer: the target's files (and
    its finishing step), the compressed blocks when lossy passes ran, and the tokenizer of a
    model that generates."""
    write = target.writer()

    def files(directory: Path) -> dict[str, str]:
        written = write(program, directory, target)
        if target.finish is not None:
            written = registry.resolve(target.finish)(manifest, directory, written, destination)
        if compression is not None:
            written["compressed"] = compression.write_tensors(directory)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
            written["tokenizer"] = TOKENIZER_FILE
        return written

    return files


def _tokenizer_file(loaded: LoadedSource, decoding: dict) -> Path | None:
    """An ``hf:`` source's ``tokenizer.json``, for an artifact that generates."""
    path = loaded.record.get("path", "")
    if not decoding or not path.startswith("hf:"):
        return None
    found = Path(path.removeprefix("hf:")) / TOKENIZER_FILE
    return found if found.is_file() else None


def _streams_weights(
    model, settings: CompileSettings, target: registry.Target, custom_passes: bool
) -> bool:
    """Whether the compile leaves an ``hf:`` model's weights on disk until it writes them: the
    target's writer can take them so, and no pass reads them (lossy passes, the capacity
    pass's calibration, autotuning, or a caller's own passes)."""
    return (
        isinstance(model, str)
        and model.startswith("hf:")
        and target.options.get("streams_weights", False)
        and not (custom_passes or settings.wants_capacity or settings.autotune)
    )


IN_MEMORY = 2.3  # bytes of memory per byte of float32 weights, compiling in memory
IN_MEMORY_BASE = 1 << 30  # and the rest of the compile


def _check_fits_in_memory(
    model, settings: CompileSettings, target: registry.Target, lossy: list, custom_passes: bool
) -> None:
    """Refuse, before loading anything, an ``hf:`` checkpoint that must be built in memory and
    clearly will not fit: say what builds it there, how much it needs and how much there is."""
    if not (isinstance(model, str) and model.startswith("hf:")):
        return
    directory = Path(model.removeprefix("hf:"))
    if not has_safetensors(directory):
        return
    need = IN_MEMORY * Checkpoint(directory).float32_bytes + IN_MEMORY_BASE
    have = available_memory()
    if need <= have:
        return
    why = [f"--{p.name}" for p in lossy]
    why += ["--capacity"] if settings.wants_capacity else []
    why += ["--autotune"] if settings.autotune else []
    why += ["passes given in code"] if custom_passes else []
    if not target.options.get("streams_weights", False):
        why.append(f"--target {target.name}")
    raise OutOfMemoryError(
        f"{' and '.join(why)} build{'s' if len(why) == 1 else ''} {model} in memory: that "
        f"needs about {need / 1e9:.1f} GB ({IN_MEMORY} times its float32 weights and 1 GB), "
        f"and this process may use {have / 1e9:.1f} GB. Compile for --target ort or onnx "
        "without them (the weights then stream from disk), or on a machine with more memory"
    )


def _load(
    model,
    example_inputs,
    trust: dict[str, bool],
    options: dict[str, Any],
    stream: bool,
    dtype: torch.dtype,
) -> LoadedSource:
    if isinstance(model, str):
        return load_source(model, **trust, **options, lazy_weights=stream, dtype=dtype)
    if not isinstance(model, nn.Module):
        raise MoecError(f"moec.compile takes an nn.Module or a SRC string, not {type(model)}")
    inputs = example_inputs
    if inputs is not None and not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    if is_hf_model(model):
        given = None if inputs is None else tuple(inputs)
        return source_from_module(hf_model_source(model.eval(), given))
    if inputs is None:
        raise MoecError("moec.compile(model, example_inputs): example_inputs are required")
    inputs = tuple(inputs)
    return source_from_module(ModelSource(model.eval(), inputs, **options))


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
