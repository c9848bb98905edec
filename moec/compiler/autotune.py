"""``--autotune``: time a block's candidate lowerings on this host and keep the fastest.

The timing model is a single block of the block's shapes with random weights (speed does not
depend on the values) and, for external routing, a softmax top-k router in front. For each
candidate it is captured once, written with the target's writer and loaded with the target's
runner, as a user would run it, then timed at a few token counts in round-robin rounds
(`moec.timing`). Results are cached on disk (``$MOEC_CACHE_DIR/autotune.json``, default
``~/.cache/moec``) per block configuration, target, runtime versions, CPU model and thread
count, so a second compile of the same shapes on the same host times nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

import moec
from moec import registry
from moec.compiler.artifact_writer import scratch_dir
from moec.compiler.capture import capture
from moec.compiler.moe_block import MoEBlock, MoEExpertsBlock
from moec.ir.moe_spec import MoESpec
from moec.ir.moe_weights import WEIGHT_NAMES, MoEWeights
from moec.models import ModelSource
from moec.registry import Target
from moec.runtime.manifest import FileEntry, Manifest
from moec.timing import cpu_model, relative_times, round_robin

__all__ = ["TIMED_TOKENS", "Timing", "autotune", "cache_path", "measure_lowerings"]

TIMED_TOKENS = (1, 16, 256)
ROUNDS = 3
REPEAT = 5

Timing = dict[str, list[float]]  # lowering -> median seconds at each of TIMED_TOKENS
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """moec's cache directory: ``$MOEC_CACHE_DIR``, default ``~/.cache/moec``."""
    return Path(os.environ.get("MOEC_CACHE_DIR") or Path.home() / ".cache" / "moec")


def cache_path() -> Path:
    return cache_dir() / "autotune.json"


def autotune(
    spec: MoESpec, present: set[str], lowerings: list[str], target: Target
) -> tuple[Timing, bool]:
    """Seconds per token count of each of ``lowerings`` for this block on ``target``, from the
    cache when this host measured it before; returns (timing, whether it was cached)."""
    key, description = _cache_key(spec, present, lowerings, target)
    path = cache_path()
    cached = _read(path).get(key, {}).get("seconds")
    if _valid(cached, lowerings):
        return cached, True
    timing = measure_lowerings(spec, present, lowerings, target)
    cache = _read(path)  # another process may have written since
    cache[key] = {**description, "seconds": timing, "relative": relative_times(timing)}
    _write(path, cache)
    return timing, False


def _valid(timing: object, lowerings: list[str]) -> bool:
    """Whether a cached entry is a timing of ``lowerings`` at every token count."""
    return (
        isinstance(timing, dict)
        and sorted(timing) == sorted(lowerings)
        and all(
            isinstance(t, list)
            and len(t) == len(TIMED_TOKENS)
            and all(isinstance(s, (int, float)) and s > 0 for s in t)
            for t in timing.values()
        )
    )


def measure_lowerings(
    spec: MoESpec,
    present: set[str],
    lowerings: list[str],
    target: Target,
    tokens: tuple[int, ...] = TIMED_TOKENS,
    rounds: int = ROUNDS,
    repeat: int = REPEAT,
) -> Timing:
    """Per lowering, the median seconds of a call of ``target``'s runner at each of ``tokens``."""
    program = capture(_timing_model(spec, present))
    (node,) = program.moe_nodes()
    g = torch.Generator().manual_seed(1)
    external = spec.routing == "external"
    feeds = [
        {"x": torch.randn(*((t,) if external else (1, t)), spec.hidden_size, generator=g).numpy()}
        for t in tokens
    ]
    runners = []
    with tempfile.TemporaryDirectory(prefix="moec-autotune-", dir=scratch_dir()) as tmp:
        try:
            calls = {}
            for lowering in lowerings:
                program.set_lowering(node, lowering, "timed")
                directory = Path(tmp) / lowering
                directory.mkdir()
                files = target.writer()(program, directory, target)
                entries = {
                    role: FileEntry(name, (directory / name).stat().st_size, "")
                    for role, name in files.items()
                }
                manifest = Manifest(target.name, {}, program.inputs, program.outputs, entries)
                runner = target.runner_class()(manifest, directory).activate()
                runners.append(runner)
                calls[lowering] = [lambda r=runner, f=f: r.infer(f) for f in feeds]
            return round_robin(calls, rounds, repeat)
        finally:
            for runner in runners:
                runner.deactivate()


class _RoutedExperts(nn.Module):
    """A softmax top-k router feeding an experts-only block, for timing external routing."""

    def __init__(self, spec: MoESpec, weights: MoEWeights):
        super().__init__()
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = MoEExpertsBlock(spec, weights)
        self.top_k = spec.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        return self.experts(x, ids, weights)


def _timing_model(spec: MoESpec, present: set[str]) -> ModelSource:
    g = torch.Generator().manual_seed(0)
    shapes = MoEWeights.expected_shapes(spec)
    tensors = {
        name: torch.randn(*shapes[name], generator=g) * 0.02
        for name in WEIGHT_NAMES
        if name in present and shapes[name] is not None
    }
    weights = MoEWeights(**{name: tensors.get(name) for name in WEIGHT_NAMES})
    if spec.routing == "external":
        x = torch.randn(8, spec.hidden_size, generator=g)
        return ModelSource(_RoutedExperts(spec, weights), (x,), ["x"], ({0: Dim("tokens")},))
    x = torch.randn(1, 8, spec.hidden_size, generator=g)
    return ModelSource(MoEBlock(spec, weights), (x,), ["x"], ({1: Dim("tokens")},))


def _cache_key(spec, present, lowerings, target) -> tuple[str, dict]:
    import onnxruntime

    description = {
        "block": spec.with_lowering(None).to_json(),
        "weights": sorted(present),
        "lowerings": {name: _emitter(name) for name in lowerings},  # a new emitter: new timing
        "target": target.name,
        "versions": {
            "moec": moec.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "tokens": list(TIMED_TOKENS),
    }
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32], description


def _emitter(name: str) -> str:
    entry = registry.lowering(name)
    return registry.hook_name(entry.kernel or entry.onnx)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, cache: dict) -> None:
    """Write atomically (a reader never sees half a file); a cache that cannot be written is
    only a warning: the compile goes on with the timing it made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write the autotune cache %s (%s); set MOEC_CACHE_DIR", path, e)
