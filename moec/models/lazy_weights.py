"""Weights that stay on disk: a model on the meta device whose tensors know how to be built.

A tensor loaded from a checkpoint is a meta tensor with a `Load` recipe (file and key). While
`recording()` is active, every op on recorded tensors (transformers' checkpoint conversion,
moec's expert stacking, a dtype cast) gives its outputs a `Call` recipe over its inputs'
recipes; views need nothing, as a recipe belongs to a storage and a view only adds its
geometry. `materialize` builds one tensor from its recipe, reading only the tensors it needs,
so a compile can write a model's weights one tensor at a time with none of them in memory.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from moec.errors import SourceError
from moec.models.checkpoint import Checkpoint, StoredTensor, read_stored

__all__ = [
    "Call",
    "Recipe",
    "Slot",
    "checkpoint_meta",
    "fake_lazy_weights",
    "has_lazy_weights",
    "lazy_parameters",
    "materialize",
    "recipe_of",
    "recorded_slots",
    "recording",
]


class Recipe:
    """How to build one tensor from the checkpoint."""


@dataclass(eq=False)
class Load(Recipe):
    stored: StoredTensor


@dataclass(eq=False)
class Call(Recipe):
    func: Any  # an aten OpOverload
    args: Any  # tensors replaced by their recipes
    kwargs: Any
    output: int | None  # which of the op's outputs, when it has several


@dataclass(eq=False)
class View(Recipe):
    base: Recipe  # of the whole storage
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(eq=False)
class _RecipeBook:
    """Storage -> the recipe of the tensor that owns it (kept alive, so storages are not
    reused while their recipes are known). A checkpoint has one (`checkpoint_meta`); it lives
    as long as the model loaded from it holds the checkpoint."""

    entries: dict[StorageWeakRef, tuple[Recipe, torch.Tensor]] = field(default_factory=dict)

    def add(self, tensor: torch.Tensor, recipe: Recipe) -> None:
        self.entries[StorageWeakRef(tensor.untyped_storage())] = (recipe, tensor)

    def get(self, tensor: torch.Tensor) -> Recipe | None:
        if tensor.device.type != "meta":
            return None
        entry = self.entries.get(StorageWeakRef(tensor.untyped_storage()))
        if entry is None:
            return None
        recipe, owner = entry
        geometry = (tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
        if geometry == (tuple(owner.shape), owner.stride(), owner.storage_offset()):
            return recipe
        return View(recipe, *geometry)


# of the checkpoints still in use
_BOOK_OF: weakref.WeakKeyDictionary[Checkpoint, _RecipeBook] = weakref.WeakKeyDictionary()


def checkpoint_meta(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    """A meta tensor with a stored tensor's dtype and shape, and a `Load` recipe."""
    stored = checkpoint.tensors[key]
    tensor = torch.empty(stored.shape, dtype=stored.dtype, device="meta")
    book = _BOOK_OF.setdefault(checkpoint, _RecipeBook())
    book.add(tensor, Load(stored))
    return tensor


def _find(tensor: torch.Tensor) -> tuple[_RecipeBook, Recipe] | None:
    if tensor.device.type != "meta":
        return None
    for book in list(_BOOK_OF.values()):
        recipe = book.get(tensor)
        if recipe is not None:
            return book, recipe
    return None


def recipe_of(tensor: torch.Tensor) -> Recipe | None:
    """The recipe of a recorded meta tensor (None for any other tensor)."""
    found = _find(tensor)
    return None if found is None else found[1]


class _Recorder(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        found = next((f for a in inputs if (f := _find(a)) is not None), None)
        if found is None:
            return out
        book = found[0]  # the outputs' recipes go where their inputs' are
        if func._schema.is_mutable:
            raise SourceError(
                f"{func} writes into a weight read lazily from the checkpoint; moec cannot "
                "stream this model's weights"
            )
        args_r, kwargs_r = tree_map(_as_recipe_arg, (args, kwargs))
        outputs = tree_flatten(out)[0]
        aliased = {StorageWeakRef(a.untyped_storage()) for a in inputs if a.device.type == "meta"}
        for i, o in enumerate(outputs):
            new = isinstance(o, torch.Tensor) and o.device.type == "meta"
            if new and StorageWeakRef(o.untyped_storage()) not in aliased:
                book.add(o, Call(func, args_r, kwargs_r, i if len(outputs) > 1 else None))
        return out


def _as_recipe_arg(value):
    if not isinstance(value, torch.Tensor):
        return value
    recipe = recipe_of(value)
    if recipe is not None:
        return recipe
    if value.device.type == "meta":
        raise SourceError(
            "a weight of the model is neither in the checkpoint nor computed from it (a meta "
            "tensor without data); moec cannot stream this model's weights"
        )
    return value.detach().clone()


@contextmanager
def recording() -> Iterator[None]:
    """Record recipes for the outputs of every op on recorded meta tensors."""
    with _Recorder():
        yield


def materialize(recipe: Recipe) -> torch.Tensor:
    """The real tensor a recipe builds (on the CPU), reading only what it needs from disk."""
    if isinstance(recipe, Load):
        return read_stored(recipe.stored)
    if isinstance(recipe, View):
        part = _whole_part(recipe)
        if part is not None:
            return materialize(part)
        base = materialize(recipe.base)
        return base.as_strided(recipe.size, recipe.stride, recipe.offset)
    assert isinstance(recipe, Call)
    entry = _stacked_entry(recipe)
    if entry is not None:
        return materialize(entry)
    if recipe.func in JOINS and recipe.output is None:
        joined = _joined(recipe)
        if joined is not None:
            return joined
    args, kwargs = tree_map(
        lambda a: materialize(a) if isinstance(a, Recipe) else a, (recipe.args, recipe.kwargs)
    )
    kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in kwargs.items()}
    out = recipe.func(*args, **kwargs)
    return out if recipe.output is None else tree_flatten(out)[0][recipe.output]


JOINS = (torch.ops.aten.cat.default, torch.ops.aten.stack.default)


def _joined(recipe: Call) -> torch.Tensor | None:
    """A cat or stack of recipes built into its output one part at a time (so the parts are
    never all in memory beside it); None where its shape is not known beforehand."""
    shape = _shape(recipe)
    parts = recipe.args[0]
    if shape is None or not all(isinstance(p, Recipe) for p in parts):
        return None
    stack = recipe.func is torch.ops.aten.stack.default
    dim = _dim(recipe) % len(shape)
    out, start = None, 0
    for part in parts:
        tensor = materialize(part)
        tensor = tensor.unsqueeze(dim) if stack else tensor
        if out is None:
            out = torch.empty(shape, dtype=tensor.dtype)
        out.narrow(dim, start, tensor.shape[dim]).copy_(tensor)
        start += tensor.shape[dim]
        del tensor
    return out


def _stacked_entry(recipe: Call) -> Recipe | None:
    """What ``select(stack(entries), 0, i)`` is: ``entries[i]`` (also through a view that is
    exactly one part of a cat, as an expert of a fused gate/up weight is)."""
    if recipe.func is not torch.ops.aten.select.int or recipe.args[1] != 0:
        return None
    base = recipe.args[0]
    if isinstance(base, View):
        base = _whole_part(base)
    stacked = isinstance(base, Call) and base.func is torch.ops.aten.stack.default
    if not (stacked and _dim(base) == 0 and isinstance(recipe.args[2], int)):
        return None
    entries = base.args[0]
    return entries[recipe.args[2]] if -len(entries) <= recipe.args[2] < len(entries) else None


def _dim(recipe: Call) -> int:
    return recipe.args[1] if len(recipe.args) > 1 else recipe.kwargs.get("dim", 0)


def _whole_part(view: View) -> Recipe | None:
    """The input of a ``cat`` that a view of its output is exactly (a fused gate/up weight's
    gate half), so that only that input is built; None otherwise."""
    base = view.base
    if not (isinstance(base, Call) and base.func is torch.ops.aten.cat.default):
        return None
    parts, dim = base.args[0], _dim(base)
    shapes = [_shape(p) for p in parts]
    if any(s is None for s in shapes) or any(not isinstance(p, Recipe) for p in parts):
        return None
    out_shape = list(shapes[0])
    dim = dim % len(out_shape)
    out_shape[dim] = sum(s[dim] for s in shapes)
    strides = torch.empty(out_shape, device="meta").stride()  # the cat's output is contiguous
    offset = 0
    for part, shape in zip(parts, shapes, strict=True):
        if (view.size, view.stride, view.offset) == (tuple(shape), tuple(strides), offset):
            return part
        offset += shape[dim] * strides[dim]
    return None


def _shape(recipe) -> tuple[int, ...] | None:
    """A recipe's shape where it says it without being built (a load, a view, a stack or cat
    of those); None otherwise."""
    if isinstance(recipe, Load):
        return recipe.stored.shape
    if isinstance(recipe, View):
        return recipe.size
    if not (isinstance(recipe, Call) and recipe.func in JOINS and recipe.output is None):
        return None
    items = [_shape(r) if isinstance(r, Recipe) else None for r in recipe.args[0]]
    if not items or any(i is None for i in items):
        return None
    first, dim = items[0], _dim(recipe)
    if recipe.func is torch.ops.aten.stack.default:
        dim %= len(first) + 1
        same = all(i == first for i in items)
        return (*first[:dim], len(items), *first[dim:]) if same else None
    dim %= len(first)
    rest = [i[:dim] + i[dim + 1 :] for i in items]
    if any(r != rest[0] for r in rest):
        return None
    return (*first[:dim], sum(i[dim] for i in items), *first[dim + 1 :])


Slot = tuple[dict, str, torch.Tensor]  # a module's _parameters or _buffers, a name, its tensor


def recorded_slots(owners) -> list[Slot]:
    """Where the ``owners`` (modules) hold recorded tensors, as their own weights."""
    return [
        (table, name, t)
        for owner in owners
        for table in (owner._parameters, owner._buffers)
        for name, t in table.items()
        if t is not None and recipe_of(t) is not None
    ]


def has_lazy_weights(module: nn.Module) -> bool:
    return any(recipe_of(p) is not None for p in module.parameters())


def lazy_parameters(module: nn.Module) -> dict[str, Recipe]:
    """Name -> recipe of each of ``module``'s recorded parameters and buffers."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]
    return {name: r for name, t in named if (r := recipe_of(t)) is not None}


@contextmanager
def fake_lazy_weights(module: nn.Module, fake_mode=None) -> Iterator[dict[str, Recipe]]:
    """``module`` with its recorded weights as fake CPU tensors of ``fake_mode`` (what
    torch.export traces with: shapes and dtypes, no data) until exit; yields name -> recipe
    of each."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fake_mode = fake_mode or FakeTensorMode(allow_non_fake_inputs=True)
    recipes = lazy_parameters(module)
    slots = recorded_slots(module.modules())
    fakes: dict[int, torch.Tensor] = {}  # a tied weight stays one tensor
    for table, name, tensor in slots:
        if id(tensor) not in fakes:
            fake = FakeTensor(fake_mode, tensor.data, torch.device("cpu"))
            is_param = isinstance(tensor, nn.Parameter)
            fakes[id(tensor)] = nn.Parameter(fake, requires_grad=False) if is_param else fake
        table[name] = fakes[id(tensor)]
    try:
        yield recipes
    finally:
        for table, name, tensor in slots:
            table[name] = tensor
