"""The registry of targets and lowerings (after Torch-TensorRT's converter registry).

A `Lowering` is one way to compute a ``moec::moe`` node: the targets that can run it, a
capability check that returns its reasons when a block does not fit, and its emitter (a
torch.onnx translation for ONNX targets, an experts kernel for PyTorch ones). A `Target` is an
artifact kind: its files, the rule that picks a block's default lowering, the writer that makes
its files from a captured program, and the runner that loads them.

Hooks are given as callables or as ``"module:attribute"`` strings, imported on first use, so
this module imports nothing but `moec.errors`: the CLI lists its choices without torch, and
`moec.load` finds a runner without importing the compiler. The CLI's choices, settings and
manifest validation, `moec.load` and the pipeline all read the registry; a new target or
lowering is new files plus one `register_target` or `register_lowering` call (the built-in
ones are the `BUILTIN_TARGETS` and `BUILTIN_LOWERINGS` below).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from moec.errors import LoweringError, MoecError, SettingsError, TargetNotBuiltError

__all__ = [
    "BUILTIN_LOWERINGS",
    "BUILTIN_TARGETS",
    "CAPACITY",
    "DEFAULT_TARGET",
    "REFERENCE_FILE_ROLES",
    "SHARED_FILE_ROLES",
    "Lowering",
    "Prefer",
    "Target",
    "hook_name",
    "lowering",
    "lowering_names",
    "lowerings_for",
    "register_lowering",
    "register_target",
    "registered",
    "resolve",
    "target",
    "target_names",
    "unregister",
]

Hook = Callable[..., Any] | str  # a callable, or "module:attribute" imported on first use
# files any target's artifact may carry (the tokenizer: an hf: source's tokenizer.json)
SHARED_FILE_ROLES = ("compressed", "placement", "tokenizer")
# files only `moec verify` reads (to rebuild a lossy artifact's reference): a deployment may
# leave them out, and the artifact still loads and runs
REFERENCE_FILE_ROLES = ("compressed",)
CAPACITY = "capacity"  # the lowering --capacity-factor and --capacity choose (`CapacityPass`)
DEFAULT_TARGET = "ort"  # what moec compile builds without --target


def resolve(hook: Hook) -> Any:
    """The object a hook names (imported on first use)."""
    return _import(hook) if isinstance(hook, str) else hook


@functools.cache
def _import(hook: str) -> Any:
    module, _, attr = hook.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise MoecError(f"registry hook {hook!r} cannot be imported ({e}); fix its entry") from e


def hook_name(hook: Hook | None) -> str:
    """A hook as text (a callable by its qualified name), for cache keys and messages."""
    if hook is None or isinstance(hook, str):
        return str(hook)
    return f"{getattr(hook, '__module__', '?')}:{getattr(hook, '__qualname__', repr(hook))}"


@dataclass(frozen=True)
class Lowering:
    """One way to compute a ``moec::moe`` node.

    ``check(spec) -> list[str]``: why a block cannot take this lowering (empty: it can); blocks
    whose experts are modules never can. ``onnx(spec, x=..., w=...) -> (y, chosen)``: the
    torch.onnx translation of the op (ONNX targets; ``w`` maps weight names to values).
    ``kernel(spec, weights, rows, counts) -> rows``: the experts kernel the op runs in PyTorch
    (the torch target). A lowering has one of the two. ``exact``: whether it computes the block
    exactly, in words for the tables. ``note(spec) -> str``: how it runs this block where that
    varies (a quantised block's kernels), added to the reason it was chosen ('' for nothing).
    ``quantized_weights``: its ONNX emitter takes a quantised block's spec and stored codes,
    scales and zero points as they are (else it is given the float block they stand for).
    """

    name: str
    targets: tuple[str, ...]
    description: str
    check: Hook | None = None
    onnx: Hook | None = None
    kernel: Hook | None = None
    exact: str = "yes"
    note: Hook | None = None
    quantized_weights: bool = False

    def unsupported_reasons(self, spec: Any) -> list[str]:
        """Why this lowering cannot compute the block ``spec`` (a `MoESpec`; empty: it can)."""
        if spec.expert_kind == "module":
            return [
                "its experts are modules, which only the gather -> subgraph -> scatter path runs"
            ]
        return list(resolve(self.check)(spec)) if self.check is not None else []

    def with_note(self, spec: Any, reason: str) -> str:
        """``reason`` for choosing this lowering for ``spec``, with its `note` on the block."""
        note = resolve(self.note)(spec) if self.note is not None else ""
        return f"{reason}; {note}" if note else reason


@dataclass(frozen=True)
class Prefer:
    """One step of a target's default rule: ``lowering`` for every block it can compute whose
    expert GEMM (hidden x expert size) has at most ``max_expert_elements`` elements (None: any);
    the figures come from ``bench/lowering_crossover.py``. A ``quantized`` step is for blocks
    whose experts are quantised only (other blocks pass over it)."""

    lowering: str
    max_expert_elements: int | None = None
    why: str = ""
    quantized: bool = False

    def concerns(self, spec: Any) -> bool:
        return not self.quantized or spec.weight_bits is not None

    def applies(self, spec: Any) -> bool:
        limit = self.max_expert_elements
        return limit is None or spec.hidden_size * spec.expert_size <= limit


@dataclass(frozen=True)
class Target:
    """An artifact kind.

    ``files``: role -> file name the writer may produce (``model`` always). ``default``: the
    rule for a block's lowering, tried in order (the last entry is the exact fallback every
    block takes). ``autotune``: the exact lowerings ``--autotune`` times against each other.
    ``write(program, directory, target) -> {role: file}``: makes the files of a captured
    program; ``finish(manifest, directory, files, destination) -> files``: the target's last
    step once they are written (it may add files and fill the manifest's ``build`` section);
    ``runner``: the `moec.runtime.Runner` subclass that loads them. ``unavailable``:
    why this build of moec cannot compile it (then ``write`` is None). ``dtypes``: the
    floating dtypes its runtime runs, and ``runtime``, that runtime in words for messages.
    """

    name: str
    description: str
    files: dict[str, str]
    default: tuple[Prefer, ...]
    autotune: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ("float32",)
    runtime: str = ""
    placement: bool = False  # its runner runs experts over devices by a placement
    write: Hook | None = None
    finish: Hook | None = None
    runner: Hook | None = None
    unavailable: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def fallback(self) -> str:
        """The exact lowering every block of this target can take."""
        return self.default[-1].lowering

    def writer(self) -> Callable[..., dict[str, str]]:
        if self.write is None:
            raise TargetNotBuiltError(self.unavailable or f"target {self.name} cannot be compiled")
        return resolve(self.write)

    def runner_class(self) -> type:
        if self.runner is None:
            raise TargetNotBuiltError(f"this version of moec cannot run {self.name!r} artifacts")
        return resolve(self.runner)


_GATHER = Prefer("gather", why="the exact grouped lowering in standard ops")
_ONNX_FILES = {"model": "model.onnx", "weights": "model.onnx.data"}
_ON_ONNX_RUNTIME = {  # what the two ONNX targets share: their writer, runner and its dtypes
    "dtypes": ("float32", "float16"),
    "runtime": "ONNX Runtime on CPU",
    "write": "moec.compiler.onnx_artifact:write_onnx",
    "runner": "moec.runtime.ort_runner:OrtRunner",
}
BUILTIN_TARGETS = (
    Target(
        "ort",
        "model.onnx for ONNX Runtime; may use com.microsoft.MoE and MoEGroupRouter",
        _ONNX_FILES,
        (
            Prefer("fused", None, "ORT's QMoE runs quantised experts on their codes", True),
            Prefer("fused", 65536, "ORT's fused MoE op, measured faster up to this size"),
            _GATHER,
        ),
        autotune=("fused", "gather"),
        options={"standard_ops_only": False, "streams_weights": True},
        **_ON_ONNX_RUNTIME,
    ),
    Target(
        "onnx",
        "model.onnx with standard ops only, for TensorRT and other ONNX runtimes",
        _ONNX_FILES,
        (_GATHER,),
        options={"standard_ops_only": True, "streams_weights": True},
        **_ON_ONNX_RUNTIME,
    ),
    Target(
        "trt",
        "model.onnx checked against TensorRT's ONNX support, and model.plan, its TensorRT engine "
        "(built where TensorRT and a GPU are, else later by moec build-engine)",
        {**_ONNX_FILES, "engine": "model.plan"},
        (Prefer("counting", why="the exact grouped lowering TensorRT parses (no TopK of pairs)"),),
        dtypes=("float32", "float16", "bfloat16"),
        runtime="TensorRT",
        write="moec.compiler.onnx_artifact:write_onnx",
        finish="moec.compiler.trt_artifact:finish_trt",
        runner="moec.runtime.trt_runner:TrtRunner",
        options={
            "standard_ops_only": True,
            "streams_weights": True,
            "profiles": True,  # takes --precision and --trt-shapes
            "symmetric_weights_only": True,  # TensorRT dequantises with zero point 0
            "weight_only_bits": ("int4",),  # its weight-only quantisation is INT4's
            "onnx_rewrite": "moec.compiler.trt_legalize:legalize_for_tensorrt",
            "portable_runner": "moec.runtime.ort_runner:OrtRunner",  # runs its ONNX elsewhere
        },
    ),
    Target(
        "torch",
        "model.pt2 (an ExportedProgram) whose moec::moe nodes run moec's kernels",
        {"model": "model.pt2"},
        (Prefer("kernel", why="one GEMM per expert on weights packed at load"),),
        autotune=("kernel", "grouped_mm"),
        dtypes=("float32", "float16", "bfloat16"),
        runtime="PyTorch",
        placement=True,
        write="moec.compiler.pt2_artifact:write_pt2",
        runner="moec.runtime.torch_runner:TorchRunner",
    ),
)

BUILTIN_LOWERINGS = (
    Lowering(
        "fused",
        ("ort",),
        "com.microsoft.MoE; routing it cannot express is computed in standard ops",
        check="moec.compiler.lower_moe_fused:unsupported_reasons",
        onnx="moec.compiler.lower_moe_fused:lower_moe_fused",
        quantized_weights=True,  # com.microsoft.QMoE runs the packed codes
        note="moec.compiler.lower_qmoe:qmoe_note",
    ),
    Lowering(
        "gather",
        ("ort", "onnx"),
        "each expert gathers its tokens -> FFN -> each token gathers its k output rows back",
        onnx="moec.compiler.lower_moe_gather:lower_moe_gather",
    ),
    Lowering(
        "counting",
        ("ort", "onnx", "trt"),
        "gather, with the pairs grouped by a counting sort instead of a TopK over them "
        "(TensorRT's TopK takes k < 3840)",
        onnx="moec.compiler.lower_moe_gather:lower_moe_counting",
    ),
    Lowering(
        CAPACITY,
        ("ort", "onnx", "trt"),
        "static [E, C, H] buffers and batched MatMuls, C = min(T, ceil(F T k / E))",
        check="moec.compiler.lower_moe_capacity:unsupported_reasons",
        onnx="moec.compiler.lower_moe_capacity:lower_moe_capacity",
        exact="if no expert overflows",
    ),
    Lowering(
        "dense",
        ("ort", "onnx", "trt"),
        "every expert on every token, masked combine (E/k times the FLOPs)",
        onnx="moec.compiler.lower_moe_dense:lower_moe_dense",
    ),
    Lowering(
        "kernel",
        ("torch",),
        "tokens grouped by expert, one GEMM per expert; weights packed for oneDNN at load",
        kernel="moec.ir.expert_kernels:grouped_experts",
        note="moec.runtime.quantized_gemm:quantized_kernel_note",
    ),
    Lowering(
        "grouped_mm",
        ("torch",),
        "tokens grouped by expert, one torch._grouped_mm per projection, on the stored weights",
        check="moec.ir.expert_kernels:grouped_mm_unsupported_reasons",
        kernel="moec.ir.expert_kernels:grouped_mm_experts",
    ),
)

_TARGETS: dict[str, Target] = {t.name: t for t in BUILTIN_TARGETS}
_LOWERINGS: dict[str, Lowering] = {lw.name: lw for lw in BUILTIN_LOWERINGS}


def register_target(entry: Target) -> Target:
    """Add a target. The lowerings its default rule and ``autotune`` name must be registered for
    it already, and the rule's last step, the fallback, must hold for blocks of any size."""
    if entry.name in _TARGETS:
        raise MoecError(f"target {entry.name!r} is already registered")
    if "model" not in entry.files or not entry.default:
        raise MoecError(f"target {entry.name!r} needs a 'model' file and a default rule")
    for name in (*(step.lowering for step in entry.default), *entry.autotune):
        if entry.name not in lowering(name).targets:
            raise MoecError(f"target {entry.name!r} names lowering {name!r}, not registered for it")
    if entry.default[-1].max_expert_elements is not None:
        raise MoecError(f"target {entry.name!r}: the last step of its default rule needs no bound")
    _TARGETS[entry.name] = entry
    return entry


def register_lowering(entry: Lowering) -> Lowering:
    """Add a lowering for the targets it names."""
    if entry.name in _LOWERINGS:
        raise MoecError(f"lowering {entry.name!r} is already registered")
    if (entry.onnx is None) == (entry.kernel is None):
        raise MoecError(f"lowering {entry.name!r} needs one emitter: onnx or kernel")
    _LOWERINGS[entry.name] = entry
    return entry


def unregister(entry: Target | Lowering) -> None:
    """Remove a target or lowering that was registered (not a built-in one)."""
    if entry in BUILTIN_TARGETS or entry in BUILTIN_LOWERINGS:
        raise MoecError(f"{entry.name!r} is built in and cannot be unregistered")
    table = _TARGETS if isinstance(entry, Target) else _LOWERINGS
    if table.get(entry.name) is entry:
        del table[entry.name]


@contextmanager
def registered(*entries: Target | Lowering) -> Iterator[None]:
    """Register ``entries`` for the duration of a with-block (tests, experiments)."""
    done: list[Target | Lowering] = []
    try:
        for entry in entries:
            (register_target if isinstance(entry, Target) else register_lowering)(entry)
            done.append(entry)
        yield
    finally:
        for entry in reversed(done):
            unregister(entry)


def target_names() -> tuple[str, ...]:
    return tuple(_TARGETS)


def lowering_names() -> tuple[str, ...]:
    return tuple(_LOWERINGS)


def target(name: str) -> Target:
    if name not in _TARGETS:
        raise SettingsError(f"unknown target {name!r}; choose one of {target_names()}")
    return _TARGETS[name]


def lowering(name: str) -> Lowering:
    if name not in _LOWERINGS:
        raise LoweringError(f"unknown lowering {name!r}; choose one of {lowering_names()}")
    return _LOWERINGS[name]


def lowerings_for(target_name: str) -> tuple[str, ...]:
    """The lowerings ``target_name`` can run, in registration order."""
    return tuple(n for n, lw in _LOWERINGS.items() if target_name in lw.targets)
