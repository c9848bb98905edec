"""`CompileSettings`: every knob of a compile, in one torch-free dataclass (after
Torch-TensorRT's ``_settings.py``).

``moec compile`` and ``moec.compile`` both build it from flags (`CompileSettings.from_flags`:
``--merge-method`` is ``merge_method``), and it is validated in one place, here: an unknown
target or lowering, a value out of range, and a flag given without the one it needs are each a
`SettingsError` (or `LoweringError`) naming the flags. The manifest stores `to_dict()`, and
``moec inspect OUT`` prints it. Defaults are the named constants below.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from moec import registry
from moec.errors import LoweringError, SettingsError

__all__ = [
    "DEFAULT_TARGET",
    "DISTILL_INITS",
    "DISTILL_TRAIN",
    "DTYPES",
    "FLAGS",
    "MERGE_METHODS",
    "PRUNE_METHODS",
    "QUANTIZE_BITS",
    "CompileSettings",
    "DistillOptions",
    "Flag",
    "MergeOptions",
    "PruneOptions",
    "QuantizeOptions",
]

DEFAULT_TARGET = registry.DEFAULT_TARGET
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype -> dtype name
MERGE_METHODS = ("hc", "router-logits", "random")
PRUNE_METHODS = ("frequency", "reap", "reconstruction")
DISTILL_INITS = ("concat", "average")
DISTILL_TRAIN = ("all", "ffn")
QUANTIZE_BITS = {"int8": 8, "int4": 4}  # --quantize -> bits
QUANTIZE_BLOCK = {"int8": None, "int4": 32}  # default --block-size (None: one scale per row)
TRT_SHAPE_RE = re.compile(r"^\s*([^:\s]+)\s*:\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")


@dataclass(frozen=True)
class MergeOptions:
    """``merge-experts``: keep ``keep`` experts per block (a fraction in (0, 1] or a count)."""

    keep: float | int
    method: str = "hc"
    lstsq: bool = False

    def __post_init__(self):
        _keep("--merge-experts", self.keep)
        _choice("--merge-method", self.method, MERGE_METHODS)


@dataclass(frozen=True)
class PruneOptions:
    """``prune-experts``: keep the ``keep`` most valuable experts of each block."""

    keep: float | int
    method: str = "frequency"

    def __post_init__(self):
        _keep("--prune-experts", self.keep)
        _choice("--prune-method", self.method, PRUNE_METHODS)


@dataclass(frozen=True)
class DistillOptions:
    """How ``distill-dense`` fits and trains its dense FFNs (`moec.passes.distill_dense`)."""

    width: int | None = None
    steps: int = 0
    blocks: tuple[str, ...] | None = None
    init: str = "concat"
    train: str = "all"
    lr: float = 1e-3
    batch_tokens: int = 1024
    label_weight: float = 0.0
    block_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.width is not None and self.width <= 0:
            raise SettingsError(f"--dense-width must be > 0, not {self.width}")
        if self.steps < 0:
            raise SettingsError(f"--distill-steps must be >= 0, not {self.steps}")
        if self.block_steps is not None and self.block_steps < 0:
            raise SettingsError(
                f"--distill-block-steps: block steps must be >= 0, not {self.block_steps}"
            )
        if not self.lr > 0:
            raise SettingsError(f"--distill-lr: the learning rate must be > 0, not {self.lr}")
        if self.batch_tokens <= 0:
            raise SettingsError(
                f"--distill-batch-tokens: batch tokens must be > 0, not {self.batch_tokens}"
            )
        _choice("--distill-init", self.init, DISTILL_INITS)
        _choice("--distill-train", self.train, DISTILL_TRAIN)
        if not 0.0 <= self.label_weight <= 1.0:
            raise SettingsError(
                f"--distill-label-weight: the label weight must be in [0, 1], not "
                f"{self.label_weight}"
            )


@dataclass(frozen=True)
class QuantizeOptions:
    """``quantize-experts``: expert weights as ``bits`` codes, one scale per ``block_size``
    weights along the input dim (None: per row), zero point stored unless ``symmetric``."""

    bits: str
    block_size: int | None = None
    symmetric: bool = False
    dense: bool = False  # the model's other linear layers too

    def __post_init__(self):
        _choice("--quantize", self.bits, tuple(QUANTIZE_BITS))
        block = self.block_size
        if block is not None and (block < 16 or block & (block - 1)):
            raise SettingsError(
                f"--block-size {block}: a block is a power of 2 of at least 16 weights "
                "(32, 64, 128 are usual)"
            )


@dataclass(frozen=True)
class Flag:
    """One ``moec compile`` flag: the keyword it is in `CompileSettings.from_flags` and
    ``moec.compile``, its option, help, kind (``choice``, ``float``, ``int``, ``keep``,
    ``path``, ``list``, ``flag``), the flag it needs, and the default it stands for."""

    name: str
    option: str
    help: str
    kind: str
    needs: str | None = None
    default: Any = None
    choices: tuple[str, ...] = ()
    short: str | None = None


FLAGS: tuple[Flag, ...] = (
    Flag("target", "--target", "What to build.", "choice", default=DEFAULT_TARGET, short="-t"),
    Flag("lowering", "--lowering", "Lower every MoE block this way instead of the target's "
         "default rule.", "choice"),
    Flag("dtype", "--dtype", "Weights and activations in this precision (routing stays "
         "float32).", "choice", default="fp32", choices=tuple(DTYPES)),
    Flag("precision", "--precision", "TensorRT (--target trt): the engine's precision, as "
         "--dtype (routing stays float32).", "choice", choices=tuple(DTYPES)),
    Flag("trt_shapes", "--trt-shapes", "TensorRT (--target trt): a dynamic dim's profile "
         "range, NAME:MIN,OPT,MAX (repeat for more dims).", "profile"),
    Flag("capacity_factor", "--capacity-factor", "Capacity lowering with C = ceil(F * T * k / "
         "E) slots.", "float"),
    Flag("capacity", "--capacity", "Capacity lowering sized by the largest expert load on "
         "calibration inputs.", "choice", choices=("auto",)),
    Flag("no_kv_cache", "--no-kv-cache", "Compile causal LMs without KV cache inputs and "
         "outputs (one full pass per call).", "flag"),
    Flag("no_routing_outputs", "--no-routing-outputs", "Leave the per-block routing masks out "
         "of the outputs (verify then checks the model's outputs only).", "flag"),
    Flag("autotune", "--autotune", "Choose each block's lowering by timing the target's "
         "candidates on this host (cached).", "flag"),
    Flag("calib", "--calib", "Calibration data for lossy passes: token ids .npy [N, S], or "
         "text for the tokenizer.", "path"),
    Flag("calib_samples", "--calib-samples", "Use at most this many calibration sequences.",
         "int", needs="calib"),
    Flag("merge_experts", "--merge-experts", "Merge experts down to KEEP per block (fraction "
         "or count).", "keep"),
    Flag("merge_method", "--merge-method", "How to cluster experts.", "choice",
         needs="merge_experts", default=MergeOptions.method, choices=MERGE_METHODS),
    Flag("merge_lstsq", "--merge-lstsq", "Refit merged down projections by least squares.",
         "flag", needs="merge_experts"),
    Flag("prune_experts", "--prune-experts", "Keep the KEEP most valuable experts per block.",
         "keep"),
    Flag("prune_method", "--prune-method", "How to value experts.", "choice",
         needs="prune_experts", default=PruneOptions.method, choices=PRUNE_METHODS),
    Flag("distill_dense", "--distill-dense", "Replace MoE blocks by dense FFNs fitted to them.",
         "flag"),
    Flag("dense_width", "--dense-width", "Neurons of each dense FFN [top_k x expert size].",
         "int", needs="distill_dense"),
    Flag("distill_steps", "--distill-steps", "Adam steps after the fit.", "int",
         needs="distill_dense", default=DistillOptions.steps),
    Flag("distill_blocks", "--distill-blocks", "Comma-separated MoE block paths to distil "
         "[all].", "list", needs="distill_dense"),
    Flag("distill_init", "--distill-init", "How to initialise the dense FFNs.", "choice",
         needs="distill_dense", default=DistillOptions.init, choices=DISTILL_INITS),
    Flag("distill_train", "--distill-train", "What the distillation steps train: every "
         "weight, or only the dense FFNs.", "choice", needs="distill_dense",
         default=DistillOptions.train, choices=DISTILL_TRAIN),
    Flag("distill_lr", "--distill-lr", "Peak Adam learning rate.", "float",
         needs="distill_dense", default=DistillOptions.lr),
    Flag("distill_batch_tokens", "--distill-batch-tokens", "Tokens per step.", "int",
         needs="distill_dense", default=DistillOptions.batch_tokens),
    Flag("distill_label_weight", "--distill-label-weight", "Share of next-token "
         "cross-entropy on the calibration text in the loss (language models).", "float",
         needs="distill_dense", default=DistillOptions.label_weight),
    Flag("quantize", "--quantize", "Store expert weights as int8 or int4 codes with a scale "
         "per block (weight-only, round-to-nearest).", "choice", choices=tuple(QUANTIZE_BITS)),
    Flag("block_size", "--block-size", "Weights per quantisation scale along the input dim "
         "[int4: 32, int8: 0, one scale per row].", "int", needs="quantize"),
    Flag("symmetric", "--symmetric", "Quantise around zero (no stored zero points).", "flag",
         needs="quantize"),
    Flag("quantize_dense", "--quantize-dense", "Quantise the model's linear layers outside its "
         "MoE blocks too.", "flag", needs="quantize"),
    Flag("distill_block_steps", "--distill-block-steps", "Adam steps fitting each dense FFN "
         "alone to its block's outputs before end-to-end training [--distill-steps when "
         "blocks train alone, else 0].", "int", needs="distill_dense"),
)  # fmt: skip
_BY_NAME = {f.name: f for f in FLAGS}
_DISTILL_FIELDS = {  # flag -> DistillOptions field
    "dense_width": "width",
    "distill_steps": "steps",
    "distill_blocks": "blocks",
    "distill_init": "init",
    "distill_train": "train",
    "distill_lr": "lr",
    "distill_batch_tokens": "batch_tokens",
    "distill_label_weight": "label_weight",
    "distill_block_steps": "block_steps",
}


@dataclass(frozen=True)
class CompileSettings:
    """How to compile.

    - ``target``: a registered target; ``lowering``: force one registered lowering on every
      block (the target must run it); ``dtype``: ``fp32``, ``fp16`` or ``bf16`` (the
      target's runtime must run it); ``capacity``: a capacity factor F > 0 or ``"auto"``,
      which chooses the ``capacity`` lowering; ``autotune``: time the target's candidate
      lowerings on this host instead of its default rule; ``kv_cache``: causal LMs take and
      return their KV cache (`moec.models.kv_cache`); ``routing_outputs``: the artifact outputs
      each block's routing mask (`moec.compiler.drop_routing` leaves them out); ``trt_shapes``:
      dim name -> [min, opt, max] of a TensorRT engine's profile (`moec.compiler.trt_profiles`;
      ``--precision``, the trt target's name for ``--dtype``, is stored as ``dtype``).
    - ``calib``: calibration data for the lossy passes (``calib_samples`` rows at most);
      ``merge``, ``prune``, ``distill``, ``quantize``: the lossy passes asked for (they run in
      that order).
    """

    target: str = DEFAULT_TARGET
    lowering: str | None = None
    dtype: str = "fp32"
    capacity: float | str | None = None
    autotune: bool = False
    kv_cache: bool = True
    routing_outputs: bool = True
    trt_shapes: dict[str, list[int]] | None = None
    calib: str | None = None
    calib_samples: int | None = None
    merge: MergeOptions | None = None
    prune: PruneOptions | None = None
    distill: DistillOptions | None = None
    quantize: QuantizeOptions | None = None

    def __post_init__(self):
        target = registry.target(self.target)
        _choice("--dtype", self.dtype, tuple(DTYPES))
        if DTYPES[self.dtype] not in target.dtypes:
            runs = ", ".join(k for k, v in DTYPES.items() if v in target.dtypes)
            runtime = target.runtime or "its runtime"
            raise SettingsError(
                f"--dtype {self.dtype}: target {target.name} runs on {runtime}, which has no "
                f"{DTYPES[self.dtype]} kernels; it can run {runs}"
            )
        if self.trt_shapes is not None and not target.options.get("profiles", False):
            raise SettingsError(
                f"--trt-shapes sets a TensorRT engine's profile; target {target.name} builds no "
                "engine (use --target trt)"
            )
        if self.lowering is not None:
            registry.lowering(self.lowering)
            allowed = registry.lowerings_for(target.name)
            if self.lowering not in allowed:
                raise LoweringError(
                    f"--lowering {self.lowering} cannot run on target {target.name}; it can "
                    f"run: {', '.join(allowed)}"
                )
        if self.capacity is not None:
            number = isinstance(self.capacity, (int, float)) and not isinstance(self.capacity, bool)
            if self.capacity != "auto" and not (number and self.capacity > 0):
                raise SettingsError(
                    "--capacity-factor must be a number > 0 (or use --capacity auto), not "
                    f"{self.capacity!r}"
                )
            if self.lowering not in (None, registry.CAPACITY):
                raise SettingsError(
                    "--capacity-factor/--capacity choose the capacity lowering; they cannot be "
                    f"combined with --lowering {self.lowering}"
                )
            allowed = registry.lowerings_for(target.name)
            if registry.CAPACITY not in allowed:
                raise LoweringError(
                    f"--capacity-factor/--capacity choose the {registry.CAPACITY} lowering, which "
                    f"target {target.name} cannot run; it can run: {', '.join(allowed)}"
                )
        if self.autotune and (self.lowering is not None or self.capacity is not None):
            raise SettingsError(
                "--autotune times the target's default candidates; it cannot be combined with "
                "--lowering, --capacity-factor or --capacity"
            )
        quantize = self.quantize
        runs = target.options.get("weight_only_bits", tuple(QUANTIZE_BITS))
        if quantize and quantize.bits not in runs:
            raise SettingsError(
                f"--quantize {quantize.bits}: target {target.name} runs weight-only quantised "
                f"weights as {' or '.join(runs)} only (TensorRT's INT8 quantises the "
                "activations too); use --quantize int4 --symmetric, or another target"
            )
        if quantize and not quantize.symmetric and target.options.get("symmetric_weights_only"):
            raise SettingsError(
                f"--quantize {self.quantize.bits}: target {target.name} dequantises with "
                "zero point 0 only (TensorRT's DequantizeLinear); add --symmetric"
            )
        if self.calib_samples is not None and self.calib_samples < 1:
            raise SettingsError(f"--calib-samples must be >= 1, not {self.calib_samples}")
        if self.lossy_flags and self.calib is None:
            raise SettingsError(
                f"{', '.join(self.lossy_flags)} need calibration data: give --calib FILE"
            )
        if self.calib is not None and not self.lossy_flags:
            raise SettingsError(
                "--calib drives the lossy passes; give --merge-experts, --prune-experts, "
                "--distill-dense or --quantize with it (moec inspect SRC --calib FILE shows "
                "expert load)"
            )

    @property
    def lossy_flags(self) -> list[str]:
        """The lossy passes asked for, as their flags."""
        asked = {"--merge-experts": self.merge, "--prune-experts": self.prune}
        asked["--distill-dense"] = self.distill
        asked["--quantize"] = self.quantize
        return [flag for flag, options in asked.items() if options is not None]

    @property
    def dtype_name(self) -> str:
        """``dtype`` as torch and numpy name it (``float16``)."""
        return DTYPES[self.dtype]

    @property
    def wants_capacity(self) -> bool:
        return self.capacity is not None or self.lowering == registry.CAPACITY

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> CompileSettings:
        """Settings from flags by keyword (as ``moec compile`` names them, ``-`` as ``_``);
        a flag set to None or False is not given. ``capacity`` also takes the factor itself
        (``moec.compile(..., capacity=1.5)``)."""
        given = {k: v for k, v in flags.items() if v is not None and v is not False and v != ()}
        _precision_as_dtype(given)
        factor = given.get("capacity")
        if isinstance(factor, (int, float)) and not isinstance(factor, bool):
            if "capacity_factor" in given:
                raise SettingsError("give --capacity-factor F or --capacity auto, not both")
            given["capacity_factor"] = given.pop("capacity")
        unknown = sorted(set(given) - set(_BY_NAME))
        if unknown:
            raise SettingsError(f"unknown compile setting(s) {unknown}; known: {sorted(_BY_NAME)}")
        for name, value in given.items():
            _check_kind(_BY_NAME[name], value)
        for name in given:
            needs = _BY_NAME[name].needs
            if needs is not None and needs not in given:
                option, other = _BY_NAME[name].option, _BY_NAME[needs].option
                raise SettingsError(
                    f"{option} needs {other} (the options that go with {other} do nothing "
                    f"without it): give {other}, or drop {option}"
                )
        if "capacity_factor" in given and "capacity" in given:
            raise SettingsError("give --capacity-factor F or --capacity auto, not both")
        merge = prune = distill = None
        if "merge_experts" in given:
            merge = MergeOptions(
                given["merge_experts"],
                given.get("merge_method", MergeOptions.method),
                bool(given.get("merge_lstsq", False)),
            )
        if "prune_experts" in given:
            prune = PruneOptions(
                given["prune_experts"], given.get("prune_method", PruneOptions.method)
            )
        if "distill_dense" in given:
            fields = {_DISTILL_FIELDS[k]: v for k, v in given.items() if k in _DISTILL_FIELDS}
            blocks = fields.get("blocks")
            if blocks is not None:
                fields["blocks"] = tuple(blocks.split(",") if isinstance(blocks, str) else blocks)
            distill = DistillOptions(**fields)
        quantize = None
        if "quantize" in given:
            bits = given["quantize"]
            block = given.get("block_size", QUANTIZE_BLOCK.get(bits))
            quantize = QuantizeOptions(
                bits,
                None if block == 0 else block,
                bool(given.get("symmetric", False)),
                bool(given.get("quantize_dense", False)),
            )
        return cls(
            target=given.get("target", DEFAULT_TARGET),
            lowering=given.get("lowering"),
            dtype=given.get("dtype", "fp32"),
            trt_shapes=parse_trt_shapes(given.get("trt_shapes")),
            capacity=given.get("capacity_factor", given.get("capacity")),
            autotune=bool(given.get("autotune", False)),
            kv_cache=not given.get("no_kv_cache", False),
            routing_outputs=not given.get("no_routing_outputs", False),
            calib=None if "calib" not in given else os.fspath(given["calib"]),
            calib_samples=given.get("calib_samples"),
            merge=merge,
            prune=prune,
            distill=distill,
            quantize=quantize,
        )

    # -- storing and printing -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.distill is not None and self.distill.blocks is not None:
            data["distill"]["blocks"] = list(self.distill.blocks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompileSettings:
        """Settings as a manifest stores them (`to_dict`)."""
        try:
            options = {
                "merge": MergeOptions,
                "prune": PruneOptions,
                "distill": DistillOptions,
                "quantize": QuantizeOptions,
            }
            values = dict(data)
            for key, kind in options.items():
                if values.get(key) is not None:
                    values[key] = kind(**values[key])
            if values.get("distill") is not None and values["distill"].blocks is not None:
                blocks = tuple(values["distill"].blocks)
                values["distill"] = dataclasses.replace(values["distill"], blocks=blocks)
            return cls(**values)
        except TypeError as e:
            raise SettingsError(f"compile settings {data}: {e}") from e

    def rows(self) -> list[tuple[str, str]]:
        """(flag, value) of every setting that is not its default, and the target, to print."""
        rows = [("--target", self.target)]
        if self.dtype != "fp32":
            rows.append(("--dtype", self.dtype))
        for name, (low, opt, high) in (self.trt_shapes or {}).items():
            rows.append(("--trt-shapes", f"{name}:{low},{opt},{high}"))
        plain = {"--lowering": self.lowering, "--calib": self.calib}
        plain["--calib-samples"] = self.calib_samples
        if self.capacity is not None:
            plain["--capacity" if self.capacity == "auto" else "--capacity-factor"] = self.capacity
        rows += [(flag, str(value)) for flag, value in plain.items() if value is not None]
        if self.autotune:
            rows.append(("--autotune", "yes"))
        if not self.kv_cache:
            rows.append(("--no-kv-cache", "yes"))
        if not self.routing_outputs:
            rows.append(("--no-routing-outputs", "yes"))
        for flag, options in (
            ("--merge-experts", self.merge),
            ("--prune-experts", self.prune),
            ("--distill-dense", self.distill),
            ("--quantize", self.quantize),
        ):
            if options is not None:
                values = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(options).items())
                rows.append((flag, values))
        return rows


KINDS: dict[str, tuple[type, ...]] = {
    "flag": (bool,),
    "int": (int,),
    "float": (int, float),
    "keep": (int, float),
    "path": (str, os.PathLike),
    "list": (str, list, tuple),
    "choice": (str,),
    "profile": (str, list, tuple, dict),
}


def _check_kind(flag: Flag, value: object) -> None:
    """Refuse a value of the wrong type for ``flag`` (the API's keywords are not parsed)."""
    number = flag.kind in ("int", "float", "keep")
    wrong_bool = isinstance(value, bool) and flag.kind != "flag"
    if wrong_bool or not isinstance(value, KINDS[flag.kind]) or (number and value != value):
        what = {
            "flag": "True or False",
            "int": "an integer",
            "float": "a number",
            "keep": "a fraction in (0, 1] or a count of experts",
            "path": "a path",
            "list": "a comma-separated string or a list",
            "choice": "a name",
            "profile": "NAME:MIN,OPT,MAX strings or a dict of name -> (min, opt, max)",
        }
        raise SettingsError(f"{flag.option} takes {what[flag.kind]}, not {value!r}")


def parse_trt_shapes(value: Iterable[str] | dict | None) -> dict[str, list[int]] | None:
    """``--trt-shapes`` values (``NAME:MIN,OPT,MAX`` strings, or a dict of name -> three ints)
    as name -> [min, opt, max], checked for form and order."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    items = value.items() if isinstance(value, dict) else [_split_trt_shape(text) for text in value]
    parsed: dict[str, list[int]] = {}
    for name, sizes in items:
        sizes = list(sizes)
        if len(sizes) != 3 or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes):
            raise SettingsError(f"--trt-shapes {name}: give three integers MIN,OPT,MAX")
        low, opt, high = sizes
        if not 0 <= low <= opt <= high:
            raise SettingsError(
                f"--trt-shapes {name}:{low},{opt},{high}: need 0 <= MIN <= OPT <= MAX"
            )
        if name in parsed:
            raise SettingsError(f"--trt-shapes names {name} twice")
        parsed[name] = [low, opt, high]
    return parsed or None


def _split_trt_shape(text: str) -> tuple[str, list[int]]:
    match = TRT_SHAPE_RE.match(str(text))
    if match is None:
        raise SettingsError(
            f"--trt-shapes {text!r}: write NAME:MIN,OPT,MAX, e.g. sequence_length:1,128,512"
        )
    return match.group(1), [int(match.group(i)) for i in (2, 3, 4)]


def _precision_as_dtype(given: dict[str, Any]) -> None:
    """``--precision`` is the trt target's name for ``--dtype``: the ONNX is typed in it
    (routing in float32) and the engine built strongly typed from it."""
    if "precision" not in given:
        return
    precision = given.pop("precision")
    name = given.get("target", DEFAULT_TARGET)
    if not registry.target(name).options.get("profiles", False):
        raise SettingsError(
            f"--precision sets a TensorRT engine's precision; target {name} takes --dtype "
            f"{precision} instead"
        )
    if given.get("dtype", precision) != precision:
        raise SettingsError(
            f"--precision {precision} and --dtype {given['dtype']} disagree; --precision is "
            "the trt target's name for --dtype: give one"
        )
    given["dtype"] = precision


def _keep(option: str, keep: object) -> None:
    """KEEP's type; its range depends on each block's experts (`experts_to_keep`)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise SettingsError(
            f"{option} {keep!r}: KEEP must be a fraction in (0, 1] or a count of experts"
        )


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"{option} {value!r}: choose one of {choices}")
