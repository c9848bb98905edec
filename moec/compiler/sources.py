"""Loading SRC: ``zoo:NAME``, ``hf:DIR`` (a save_pretrained directory), a ``.pt2`` archive,
``pkg.module:factory``, or (only when trusted) a pickled module from ``torch.save``.

Every source becomes a `ModelSource` plus a record (`LoadedSource.record`) that the manifest
keeps, so that ``moec verify`` can rebuild the same eager model later and check, by the sha256 of
its weights, that it is the same one.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moec.errors import NotStreamableError, SourceError
from moec.models import ModelSource, build_zoo
from moec.models.checkpoint import Checkpoint, has_safetensors
from moec.models.hf_lazy import load_hf_dir_lazily
from moec.models.hf_models import hf_model_source, hf_tokenizer, load_hf_dir
from moec.runtime.manifest import file_sha256
from moec.runtime.safe_pt2 import load_pt2

__all__ = ["LoadedSource", "load_source", "reload_source", "source_from_module", "weights_sha256"]

log = logging.getLogger(__name__)

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SRC_FORMS = (
    "zoo:NAME, hf:DIR, a .pt2 file from torch.export.save, pkg.module:factory, or a torch.save "
    "pickle with --trust-pickle"
)


@dataclass
class LoadedSource:
    model_source: ModelSource
    record: dict[str, Any]  # what the manifest keeps: spec, kind, sha256, path, ...

    @property
    def sha256(self) -> str:
        return self.record["sha256"]


def weights_sha256(model: nn.Module) -> str:
    """Content hash of a model's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def checkpoint_sha256(directory: Path) -> str:
    """Content hash of a checkpoint's weight files: their names and each one's sha256."""
    files = sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")])
    text = "".join(f"{file.name}:{file_sha256(file)};" for file in files)
    return hashlib.sha256(text.encode()).hexdigest()


def source_from_module(source: ModelSource) -> LoadedSource:
    """An in-memory model (``moec.compile(model, ...)``); verify needs it passed again."""
    record = {"spec": f"<{type(source.model).__name__}>", "kind": "module"}
    record["sha256"] = weights_sha256(source.model)
    return LoadedSource(source, record)


def load_source(
    src: str,
    *,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    example_inputs_file: str | None = None,
    lazy_weights: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LoadedSource:
    """Load SRC (see module docstring); ``example_inputs_file``: .npz for a pickled bare module.
    ``trust_pickle``: a pickle or a .pt2 that needs unpickling may run its code;
    ``trust_remote_code``: an ``hf:`` directory may run the Python code it ships;
    ``lazy_weights``: an ``hf:`` model's weights stay on disk (`load_hf_dir_lazily`); else it
    is built in ``dtype`` if its checkpoint is stored so (`load_hf_dir`)."""
    if src.startswith("zoo:"):
        loaded = build_zoo(src.removeprefix("zoo:"))
        record = {"spec": src, "kind": "zoo"}
    elif src.startswith("hf:"):
        directory = Path(src.removeprefix("hf:")).resolve()
        if has_safetensors(directory):
            Checkpoint(directory)  # names a missing or cut shard before anything reads it
        model = None
        if lazy_weights and has_safetensors(directory):
            try:
                model = load_hf_dir_lazily(str(directory), trust_remote_code)
            except NotStreamableError as e:
                log.warning("hf:%s: %s; building the model in memory", directory, e)
        if model is None:
            model = load_hf_dir(str(directory), trust_remote_code, dtype)
        loaded = hf_model_source(model)
        loaded.tokenizer = hf_tokenizer(directory, trust_remote_code)
        record = {"spec": src, "kind": "hf", "path": f"hf:{directory}"}
        record["sha256"] = checkpoint_sha256(directory)  # the same whether streamed or not
    elif os.path.exists(src):
        path = Path(src).resolve()
        if not os.access(path, os.R_OK) or path.is_dir():
            raise SourceError(f"SRC {src} is not a readable file; expected {SRC_FORMS}")
        if path.suffix == ".pt2":
            loaded = _load_pt2(path, trust_pickle)
            record = {"spec": src, "kind": "pt2", "path": str(path)}
        else:
            loaded = _load_pickle(path, trust_pickle, example_inputs_file)
            record = {"spec": src, "kind": "pickle", "path": str(path)}
            if example_inputs_file:
                record["example_inputs_file"] = str(Path(example_inputs_file).resolve())
    elif FACTORY_RE.match(src):
        loaded = _load_factory(src)
        record = {"spec": src, "kind": "factory"}
    else:
        raise SourceError(f"SRC {src} not found; expected {SRC_FORMS}")
    if "sha256" not in record:
        record["sha256"] = weights_sha256(loaded.model)
    return LoadedSource(loaded, record)


def _load_pt2(path: Path, trust_pickle: bool) -> ModelSource:
    program = load_pt2(path, trust_pickle=trust_pickle, error=SourceError, what="SRC")
    args, kwargs = program.example_inputs or ((), {})
    if kwargs or not args:
        raise SourceError(
            f"SRC {path}: the program has no positional example inputs recorded; export it "
            "again with torch.export.export(model, args) and save it with torch.export.save"
        )
    dynamic = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            shape = node.meta["val"].shape
            dynamic.append(
                {d: torch.export.Dim.AUTO for d, s in enumerate(shape) if not isinstance(s, int)}
                or None
            )
    names = list(program.graph_signature.user_inputs)
    return ModelSource(program.module(), tuple(args), names, tuple(dynamic))


def _load_pickle(path: Path, trust: bool, example_inputs: str | None) -> ModelSource:
    if not trust:
        raise SourceError(
            f"SRC {path} is a pickle (torch.save); unpickling runs arbitrary code, so moec "
            "refuses it without --trust-pickle. Pass --trust-pickle if you trust its origin, or "
            "give a .pt2 (torch.export.save) or a pkg.module:factory instead"
        )
    if not zipfile.is_zipfile(path):
        raise SourceError(f"SRC {path} is not a torch.save file (not a zip archive)")
    try:
        obj = torch.load(path, weights_only=False)
    except Exception as e:
        raise SourceError(f"SRC {path} could not be unpickled ({type(e).__name__}: {e})") from e
    if isinstance(obj, nn.Module):
        if example_inputs is None:
            raise SourceError(
                f"SRC {path} holds a bare module; moec needs example inputs to trace it: pass "
                "--example-inputs FILE.npz (arrays named like the forward's parameters), or "
                "torch.save a (model, example_inputs) tuple"
            )
        return ModelSource(obj.eval(), _read_npz(example_inputs))
    return _as_model_source(obj, f"SRC {path}")


def _read_npz(path: str) -> tuple[torch.Tensor, ...]:
    try:
        with np.load(path) as data:
            return tuple(torch.from_numpy(data[k]) for k in data.files)
    except (OSError, ValueError) as e:
        raise SourceError(f"--example-inputs {path} is not a readable .npz ({e})") from e


def _load_factory(src: str) -> ModelSource:
    module_name, _, attr = src.partition(":")
    try:
        module = _import_here_too(module_name)
    except ImportError as e:
        raise SourceError(
            f"SRC {src}: cannot import {module_name} ({e}), looked for on sys.path and in the "
            f"current directory {Path.cwd()}; run moec where {module_name.split('.')[0]} is, "
            "or add its directory to PYTHONPATH"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SourceError(f"SRC {src}: {module_name} has no callable {attr}")
    return _as_model_source(factory(), f"SRC {src}")


def _import_here_too(module_name: str):
    """Import ``module_name``, looking in the current directory too when sys.path lacks it
    (as ``python -m`` does; a console script's sys.path does not hold it)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = str(Path.cwd())
        if e.name != module_name.split(".")[0] or here in sys.path:
            raise
    sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(here)


def _as_model_source(obj: Any, where: str) -> ModelSource:
    if isinstance(obj, ModelSource):
        obj.model.eval()
        return obj
    if (
        isinstance(obj, tuple)
        and len(obj) == 2
        and isinstance(obj[0], nn.Module)
        and isinstance(obj[1], (tuple, list))
    ):
        return ModelSource(obj[0].eval(), tuple(obj[1]))
    raise SourceError(
        f"{where} gave a {type(obj).__name__}; expected a moec.models.ModelSource or a "
        "(model, example_inputs) tuple"
    )


SOURCE_KINDS = ("zoo", "hf", "pt2", "pickle", "factory", "module")


def reload_source(
    record: dict[str, Any],
    *,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    trust_source: bool = False,
    override: str | None = None,
    lazy_weights: bool = False,
) -> LoadedSource:
    """Load the source a manifest recorded again (or ``override``, the user's own SRC, in its
    place). A manifest is an artifact's word, not the user's: a recorded ``pkg.module:factory``
    is imported and called only with ``trust_source``. ``lazy_weights``: as `load_source`."""
    kind = record.get("kind")
    spec = str(record.get("spec", ""))
    if override is not None:
        src = override
    elif kind not in SOURCE_KINDS:
        raise SourceError(f"the manifest records a source of unknown kind {kind!r}")
    elif kind == "module":
        raise SourceError(
            "the artifact was compiled from an in-memory module, which moec cannot rebuild; "
            "pass the model: moec.verify(OUT, source=model)"
        )
    elif kind == "factory" and not trust_source:
        raise SourceError(
            f"the artifact's manifest names its source {spec!r}, a Python factory moec would "
            f"have to import and run; give it yourself (--source {spec}) or pass --trust-source "
            "if you trust the artifact"
        )
    elif kind in ("pt2", "pickle", "hf"):
        src = str(record.get("path", ""))
    else:
        src = spec
    return load_source(
        src,
        trust_pickle=trust_pickle,
        trust_remote_code=trust_remote_code,
        example_inputs_file=record.get("example_inputs_file"),
        lazy_weights=lazy_weights,
    )
