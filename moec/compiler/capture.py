"""Capture: swap every recognised MoE block for an op-backed `MoEBlock`, then torch.export.

The exported program's outputs are the model's own outputs followed by one routing mask per
block call (``routing.<i>``, bool [..., E]), so that every artifact can report routing agreement;
a block the model runs several times (a looped layer) is one ``moec::moe`` node per call.
The user's model is restored afterwards; only the stacked expert weights are copied.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from moec.compiler.moe_block import MoEBlock, cast_keeping_routers, op_block
from moec.errors import CaptureError, SourceError
from moec.ir.program import CapturedBlock, CapturedProgram, moe_nodes, node_spec
from moec.ir.signature import DynamicDim, TensorSpec
from moec.models import BlockMatch, ModelSource, find_moe_blocks
from moec.models.block_calls import recorded_block_calls
from moec.models.hf_patches import export_patches
from moec.models.lazy_weights import fake_lazy_weights, has_lazy_weights, recording

__all__ = [
    "NO_BLOCK_NOTE",
    "OWN_OPS",
    "SUBGRAPH",
    "capture",
    "fake_probe",
    "swap_blocks",
    "unconverted_moe_modules",
]

NO_BLOCK_NOTE = "no MoE block found; compiled as a plain export"
OWN_OPS = "it runs as the model's own ops"  # how the notes on unconverted blocks end

# the path of blocks whose experts are modules: no moec::moe node, so no registered lowering
SUBGRAPH = "subgraph"

log = logging.getLogger(__name__)


class _RoutingTap(nn.Module):
    """Returns the model's outputs followed by the routing mask of each MoE block that ran.

    ``ran`` receives the indices of those blocks while tracing (the caller keeps a reference:
    torch.export restores module attributes afterwards); a block the example inputs do not reach
    (a vision block in a text-only call) has no output.
    """

    def __init__(self, model: nn.Module, blocks: list[MoEBlock], ran: list[int]):
        super().__init__()
        self.model = model
        self.blocks = blocks
        self.ran = ran

    def forward(self, *inputs):
        for block in self.blocks:
            block.routing_sink = []
        out = self.model(*inputs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        # a block a model runs several times (a looped layer) has one routing output per call
        self.ran[:] = [i for i, block in enumerate(self.blocks) for _ in block.routing_sink]
        routing = [mask for block in self.blocks for mask in block.routing_sink]
        for block in self.blocks:
            block.routing_sink = None
        return (*outs, *routing)


def swap_blocks(
    model: nn.Module, matches: list[BlockMatch], replaced: list | None = None
) -> nn.Module:
    """Replace each matched block of ``model`` by its MoEBlock (or stand-in), in place; returns
    the root (the block itself when the model is one). ``replaced`` collects (parent, attribute,
    original) to undo it."""
    root = model
    for match in matches:
        conversion = match.conversion
        if conversion.stand_in:
            block = conversion.stand_in()
        else:
            block = op_block(
                match.spec,
                match.weights,
                match.expert_modules,
                conversion.gate,
                conversion.returns_router_logits,
            )
        if match.name == "":
            root = block
            continue
        parent_name, _, attr = match.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if replaced is not None:
            replaced.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, block)
    return root


@contextmanager
def _swapped(model: nn.Module, matches: list[BlockMatch]) -> Iterator[nn.Module]:
    """Model with its blocks replaced by MoEBlocks; the originals are put back on exit."""
    replaced: list = []
    try:
        yield swap_blocks(model, matches, replaced)
    finally:
        for parent, attr, original in reversed(replaced):
            setattr(parent, attr, original)


@contextmanager
def fake_probe(model: nn.Module) -> Iterator[None]:
    """``model``, whose weights are on disk, callable on fake tensors meanwhile: its MoE
    blocks swapped for moec's op (whose fake kernel needs no data: the families' expert loops
    do), its weights fake, in fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with recording():
        matches = find_moe_blocks(model)
    with ExitStack() as scope:
        with recording():
            swapped = scope.enter_context(_swapped(model, matches))
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
        scope.enter_context(fake_lazy_weights(swapped, fake_mode))
        scope.enter_context(fake_mode)
        yield


def capture(source: ModelSource, dtype: torch.dtype = torch.float32) -> CapturedProgram:
    """Export ``source.model`` with its MoE blocks as ``moec::moe`` nodes; with another
    ``dtype``, a copy of it in that precision (routers in float32: `cast_keeping_routers`)."""
    lazy = has_lazy_weights(source.model)
    record = recording if lazy else nullcontext
    inputs = tuple(_cast(x, dtype) for x in source.example_inputs)
    refused: dict[str, str] = {}
    with record():
        model = source.model if dtype == torch.float32 else copy.deepcopy(source.model)
        with recorded_block_calls(model, inputs):
            matches = find_moe_blocks(model, refused)
    unconverted = unconverted_moe_modules(model, matches, refused)
    input_names = source.input_names or _forward_parameter_names(model, len(inputs))
    with ExitStack() as scope:
        with record():
            swapped = scope.enter_context(_swapped(model, matches))
            patches = scope.enter_context(export_patches(model))
            if dtype != torch.float32:
                swapped = cast_keeping_routers(swapped, dtype)
        op_blocks = (
            [swapped]
            if matches and matches[0].name == ""
            else [swapped.get_submodule(m.name) for m in matches]
        )
        ran: list[int] = []
        tap = _RoutingTap(swapped, op_blocks, ran)
        dynamic = _dynamic_shapes(source, inputs)
        lazy_weights = scope.enter_context(fake_lazy_weights(tap)) if lazy else {}
        try:
            program, export_notes = _export(tap, inputs, dynamic, input_names, source.dim_sums)
        except Exception as e:  # torch.export raises many types; all mean "cannot trace"
            unconverted_why = list(refused.values()) + [f"{n} ({c})" for n, c in unconverted]
            raise CaptureError(_export_failure(e, model, matches, unconverted_why)) from e
    skipped = [m for i, m in enumerate(matches) if i not in ran]
    matches = [matches[i] for i in ran]  # one per call
    num_outputs = len(program.graph_signature.user_outputs) - len(matches)
    output_names = source.output_names or _default_output_names(num_outputs)
    if len(output_names) != num_outputs:
        raise SourceError(
            f"{len(output_names)} output names given ({output_names}) for a model with "
            f"{num_outputs} outputs"
        )
    specs = _signature(program, input_names, output_names, matches, source, dynamic)
    blocks = _blocks(program, matches)
    notes = [] if blocks else [NO_BLOCK_NOTE]
    notes += export_notes
    notes += [
        f"{m.name} ({type(m.module).__name__}) did not run on the example inputs and is not in "
        "the artifact"
        for m in skipped
    ]
    notes += [
        f"{name or '(model)'} runs {count} times per forward: one moec::moe node per call, "
        "sharing its weights, each routed anew"
        for name, count in Counter(m.name for m in matches).items()
        if count > 1
    ]
    notes += [f"rewritten for export: {patch}" for patch in patches]
    notes += [f"{reason}; {OWN_OPS}" for reason in refused.values()]
    notes += [
        f"{name} ({cls}) looks like an MoE block but no adapter converts it; {OWN_OPS}"
        for name, cls in unconverted
    ]
    return CapturedProgram(program, blocks, specs[0], specs[1], notes, lazy_weights)


def _cast(value, dtype: torch.dtype):
    """A floating example input in ``dtype``; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def _blocks(program: ExportedProgram, matches: list[BlockMatch]) -> list[CapturedBlock]:
    """Pair each moe node with its block, by the module path export records on the node."""
    by_path = {("model." + m.name).rstrip("."): m for m in matches}
    blocks = [
        CapturedBlock(
            m.name,
            "",
            type(m.module).__name__,
            m.adapter,
            m.spec.summary(),
            reason="experts are modules, not FFNs: gather -> expert subgraph -> scatter-add",
            fixed_lowering=SUBGRAPH,
        )
        for m in matches
        if m.spec.expert_kind == "module"
    ]
    for node in moe_nodes(program):
        spec = node_spec(node)
        paths = [path for path, cls in node.meta.get("nn_module_stack", {}).values()]
        match = next((by_path[p] for p in reversed(paths) if p in by_path), None)
        if match is None:  # a moec::moe the model itself calls (e.g. a re-loaded .pt2)
            blocks.append(CapturedBlock(node.name, node.name, "moec::moe", "graph", spec.summary()))
        else:
            blocks.append(
                CapturedBlock(
                    match.name,
                    node.name,
                    type(match.module).__name__,
                    match.adapter,
                    spec.summary(),
                )
            )
    return blocks


def _export(tap: nn.Module, inputs: tuple, dynamic: tuple, input_names: list[str], sums: dict):
    """torch.export with the requested dynamic dims; if torch cannot prove them (guards it
    derives from the model's code that sympy cannot simplify), again with Dim.AUTO on the same
    axes, noting any dim the model's code fixed to one size (or bounds, but for ``sums``: dims
    that are the sum of others, bounded by theirs)."""
    with torch.no_grad():
        try:
            return torch.export.export(tap, inputs, dynamic_shapes=(dynamic,)), []
        except Exception as e:
            # not only "Constraints violated": torch can fail while it writes that report
            # (a suggested Dim with min > max), so any failure gets the Dim.AUTO try
            auto = tuple({axis: Dim.AUTO for axis in dims} if dims else None for dims in dynamic)
            try:
                program = torch.export.export(tap, inputs, dynamic_shapes=(auto,))
            except Exception:
                raise e from None
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    notes = []
    for i, user_input in enumerate(program.graph_signature.user_inputs):
        shape = placeholders[user_input].meta["val"].shape
        for axis in dynamic[i] or {}:
            size = shape[axis]
            if not _is_symbolic(size):
                notes.append(
                    f"input {input_names[i]} dim {axis} is fixed at {int(size)}: the model's "
                    "code specialises it, so the artifact takes only that size"
                )
                continue
            low = program.range_constraints[size.node.expr].lower
            derived = getattr(dynamic[i][axis], "__name__", None) in sums
            if int(low) > 2 and not derived:  # 2 is torch's 0/1-specialisation floor
                notes.append(
                    f"input {input_names[i]} dim {axis} must be >= {int(low)}: the model's code "
                    "requires it"
                )
    return program, notes


def _is_symbolic(size) -> bool:
    """A dim that varies (a SymInt may still be a constant)."""
    return isinstance(size, torch.SymInt) and not size.node.expr.is_number


# class names that end like an MoE block: SparseMoeBlock, TextMoe, Experts, SparseMLP, ...
MOE_CLASS_RE = re.compile(r"(moe|moeblock|moelayer|experts|sparsemlp|mixture\w*)$", re.IGNORECASE)


def unconverted_moe_modules(
    model: nn.Module, matches: list[BlockMatch], refused: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """(name, class) of modules named like MoE blocks that no adapter converted nor refused,
    outermost only; shared experts (``...SharedExperts``), which no router picks, are not."""
    converted = [m.name for m in matches] + list(refused or {})
    found: list[tuple[str, str]] = []

    def related(a: str, b: str) -> bool:
        return a == b or a == "" or b == "" or a.startswith(f"{b}.") or b.startswith(f"{a}.")

    for name, module in model.named_modules():
        cls = type(module).__name__
        if not MOE_CLASS_RE.search(cls) or "shared" in cls.lower():  # shared: every token runs
            continue
        if any(related(name, c) for c in converted) or any(related(name, f) for f, _ in found):
            continue
        found.append((name, type(module).__name__))
    return found


def _export_failure(error: Exception, model: nn.Module, matches, unconverted) -> str:
    """What went wrong in torch.export, in a few lines a user can act on."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = lines[0] if lines else type(error).__name__
    guards = [line.removeprefix("- ") for line in lines if line.startswith("- Not all values")]
    if guards:
        detail += " " + guards[0]
    message = (
        f"torch.export could not trace {type(model).__name__}: {detail[:400]}. moec replaces "
        f"the MoE blocks it recognises ({len(matches)} found); the rest of the model must be "
        "exportable with dynamic batch and sequence"
    )
    if unconverted:
        message += f"; not converted, and likely the cause: {', '.join(unconverted[:3])}"
    return message


def _forward_parameter_names(model: nn.Module, count: int) -> list[str]:
    params = list(inspect.signature(model.forward).parameters.values())
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < count:
        names += [f"input_{i}" for i in range(len(names), count)]
    return names[:count]


def _default_output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _dynamic_shapes(source: ModelSource, inputs: tuple) -> tuple:
    if source.dynamic_shapes is not None:
        return tuple(source.dynamic_shapes)
    shapes = []
    for x in inputs:
        rank = x.dim() if isinstance(x, torch.Tensor) else 0
        shapes.append({d: Dim.AUTO for d in range(min(rank, 2))} or None)
    return tuple(shapes)


def _signature(program, input_names, output_names, matches, source, dynamic):
    """TensorSpecs of the program's user inputs and outputs; dims named as the user named them."""
    names: dict[str, str] = {}
    for i, dims in enumerate(dynamic):
        for axis, dim in (dims or {}).items():
            if isinstance(dim, Dim) and hasattr(dim, "__name__"):
                names[(i, axis)] = dim.__name__
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    symbols: dict[str, str] = {}

    def shape_of(value, input_index=None):
        shape = []
        for axis, size in enumerate(value.shape):
            if not _is_symbolic(size):
                shape.append(int(size))
                continue
            expr = size.node.expr
            key = str(expr)
            if key not in symbols and input_index is None:
                symbols[key] = _named_expression(expr, symbols, source.dim_sums)
            if key not in symbols:
                symbols[key] = names.get(
                    (input_index, axis),
                    f"{input_names[input_index]}_dim{axis}" if input_index is not None else key,
                )
            bounds = program.range_constraints.get(expr)
            # torch.export reports 2 as the lower bound of dims it assumed were not 0/1; the
            # graph itself is valid for 1, which verification checks.
            low = 1 if bounds is None or int(bounds.lower) <= 2 else int(bounds.lower)
            high = int(bounds.upper) if bounds is not None and bounds.upper.is_Integer else None
            low, high = source.dim_bounds.get(symbols[key], (low, high))
            sum_of = tuple(source.dim_sums.get(symbols[key], ()))
            shape.append(DynamicDim(symbols[key], low, high, sum_of))
        return tuple(shape)

    inputs = []
    for i, user_input in enumerate(program.graph_signature.user_inputs):
        value = placeholders[user_input].meta["val"]
        name = input_names[i]
        inputs.append(
            TensorSpec(
                name,
                _dtype_name(value.dtype),
                shape_of(value, i),
                role=source.roles.get(name, "main"),
                value_range=source.input_ranges.get(name),
            )
        )
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [a.meta["val"] for a in output_node.args[0]]
    outputs = [
        TensorSpec(name, _dtype_name(v.dtype), shape_of(v), role=source.roles.get(name, "main"))
        for name, v in zip(output_names, values, strict=False)
    ]
    for i, (match, v) in enumerate(zip(matches, values[len(output_names) :], strict=True)):
        outputs.append(
            TensorSpec(f"routing.{i}", "bool", shape_of(v), role="routing", block=match.name)
        )
    return inputs, outputs


def _named_expression(expr, symbols: dict[str, str], sums: dict[str, tuple[str, ...]]) -> str:
    """An output dim's expression in the inputs' dim names (``batch*seq``), or the name of
    the declared sum it equals (``total_sequence_length``); as exported where a symbol has no
    name."""
    import sympy

    free = expr.free_symbols
    if not free or any(str(s) not in symbols for s in free):
        return str(expr)
    named = expr.xreplace({s: sympy.Symbol(symbols[str(s)]) for s in free})
    for name, parts in sums.items():
        if sympy.expand(named - sum(sympy.Symbol(p) for p in parts)) == 0:
            return name
    return str(named)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
