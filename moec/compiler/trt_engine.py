"""Build a TensorRT engine from an artifact's ONNX (TensorRT 10 Python API, imported lazily).

The network is strongly typed: it computes in the types the ONNX declares, so the precision
is the one the ONNX was compiled in (``--precision``), and the router and routing, which moec
keeps in float32 at every precision, stay float32 in the engine. TF32 is off, so a float32
engine agrees with the eager model to float32 rounding. One optimisation profile spans the
shapes `moec.compiler.trt_profiles` chose; a timing cache in moec's cache directory makes a
rebuild on the same GPU quick.

This module has never run: TensorRT cannot be installed where moec is built and tested (see
docs/tensorrt.md). It is kept to the documented API and small.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moec.compiler.autotune import cache_dir
from moec.errors import LoweringError

__all__ = ["build_engine", "timing_cache_path"]


def build_engine(onnx_path: Path, build: dict[str, Any], timing_cache: Path | None) -> bytes:
    """The serialized engine of ``onnx_path`` (its external data beside it) for the profile in
    ``build`` (the manifest's ``build`` section: ``inputs`` -> [min, opt, max] shapes). The
    caller has checked that TensorRT and a GPU are here (`tensorrt_missing`)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strongly_typed)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        lines = [f"{e.node_name() or e.node()} ({e.node_operator()}): {e.desc()}" for e in errors]
        raise LoweringError(
            f"TensorRT's ONNX parser refused {onnx_path}:\n  " + "\n  ".join(lines or ["?"])
        )
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    workspace = build.get("workspace_bytes")
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    profile = builder.create_optimization_profile()
    engine_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, (low, opt, high) in build["inputs"].items():
        if name in engine_inputs:
            profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
    if config.add_optimization_profile(profile) < 0:
        raise LoweringError(f"TensorRT refused the profile {build['inputs']}")
    cache = _read_cache(timing_cache)
    config.set_timing_cache(config.create_timing_cache(cache), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LoweringError(
            f"TensorRT could not build an engine from {onnx_path} (its log above says why)"
        )
    _write_cache(timing_cache, config)
    return bytes(plan)


def timing_cache_path() -> Path:
    """TensorRT's timing cache, in moec's cache directory."""
    return cache_dir() / "tensorrt-timing.cache"


def _read_cache(path: Path | None) -> bytes:
    if path is None or not path.is_file():
        return b""
    return path.read_bytes()


def _write_cache(path: Path | None, config) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(bytes(cache.serialize()))
    os.replace(partial, path)
