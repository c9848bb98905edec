"""Weights that stay on disk: a model on the meta device whose tensors know how to be built.

A tensor loaded from a checkpoint is a meta tensor with a `Load` recipe (file and key). While
`recording()` is active, every op on recorded tensors (transformers' checkpoint conversion,
moec's expert stacking, a dtype cast) gives its outputs a `Call` recipe over its inputs'
recipes; views need nothing, as a recipe belongs to a storage and a view only adds its
geometry. `materialize` builds one tensor from its recipe, reading only the tensors it needs,
so a compile can write a model's weights one tensor at a time with none of them in memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from moec.errors import SourceError

__all__ = [
    "Checkpoint",
    "Recipe",
    "checkpoint_sha256",
    "fake_lazy_weights",
    "has_lazy_weights",
    "has_safetensors",
    "lazy_parameters",
    "materialize",
    "real",
    "recipe_of",
    "recording",
    "stream_layers",
]

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class StoredTensor:
    """Where a checkpoint tensor lies: its file, key, dtype and shape (from the file header)."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its bytes in the file


class Checkpoint:
    """The safetensors files of a ``save_pretrained`` directory, read by header only until a
    tensor is materialised. Missing shards and files shorter than their header says are
    refused here, naming the file and a tensor it should hold."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.tensors: dict[str, StoredTensor] = {}
        for file, keys in self._files().items():
            header = _read_header(file, keys)
            for key in keys if keys is not None else header:
                if key not in header:
                    raise SourceError(
                        f"hf:{directory}: {INDEX_FILE} puts tensor {key} in {file.name}, which "
                        "does not hold it; the checkpoint is incomplete: download it again"
                    )
                self.tensors[key] = header[key]

    def _files(self) -> dict[Path, list[str] | None]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SourceError(f"hf:{self.directory}: {INDEX_FILE} is not valid ({e})") from e
            files: dict[Path, list[str] | None] = {}
            for key, name in weight_map.items():
                path = self.directory / name
                if not path.is_file():
                    raise SourceError(
                        f"hf:{self.directory}: shard {name} is missing (it holds {key}, among "
                        "others); the checkpoint is incomplete: download it again"
                    )
                files.setdefault(path, []).append(key)  # type: ignore[union-attr]
            return files
        found = sorted(self.directory.glob("*.safetensors"))
        if not found:
            raise SourceError(f"hf:{self.directory} has no .safetensors weights")
        return {path: None for path in found}

    @property
    def float32_bytes(self) -> int:
        """The weights' size built in float32, as a compile in memory builds them."""
        return sum(_nbytes(t) // t.dtype.itemsize * 4 for t in self.tensors.values())

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored tensor's dtype and shape and a `Load` recipe."""
        stored = self.tensors[key]
        tensor = torch.empty(stored.shape, dtype=stored.dtype, device="meta")
        _BOOK.add(tensor, Load(stored))
        return tensor

    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})


def _nbytes(stored: StoredTensor) -> int:
    count = 1
    for size in stored.shape:
        count *= size
    return count * stored.dtype.itemsize


def _read_header(file: Path, expected: list[str] | None) -> dict[str, StoredTensor]:
    """The tensors a safetensors file declares; refuses a file cut short of its data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
        if length > size - 8:
            raise SourceError(f"{file} is not a safetensors file, or is truncated (no header)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{file} has a damaged safetensors header ({e})") from e
    header.pop("__metadata__", None)
    tensors = {}
    for key, entry in header.items():
        begin, end = (8 + length + o for o in entry["data_offsets"])
        if end > size:
            raise SourceError(
                f"{file} is truncated: tensor {key} ends at byte {end} of a {size}-byte file; "
                "download the checkpoint again"
            )
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SourceError(
                f"{file}: tensor {key} has dtype {entry['dtype']}, which moec reads not"
            )
        stored = StoredTensor(file, key, dtype, tuple(entry["shape"]), begin)
        if end - begin != _nbytes(stored):
            raise SourceError(
                f"{file}: tensor {key} has {end - begin} bytes for its shape's {_nbytes(stored)}"
            )
        tensors[key] = stored
    return tensors


def has_safetensors(directory: Path) -> bool:
    return (directory / INDEX_FILE).is_file() or any(directory.glob("*.safetensors"))


def checkpoint_sha256(directory: Path) -> str:
    """Content hash of a checkpoint's weight files (names and bytes), read in chunks."""
    digest = hashlib.sha256()
    files = [*directory.glob("*.safetensors"), *directory.glob("*.bin")]
    for file in sorted(files):
        digest.update(f"{file.name};".encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


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


@dataclass
class _RecipeBook:
    """Storage -> the recipe of the tensor that owns it (kept alive, so storages are not
    reused while their recipes are known)."""

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


_BOOK = _RecipeBook()


def recipe_of(tensor: torch.Tensor) -> Recipe | None:
    """The recipe of a recorded meta tensor (None for any other tensor)."""
    return _BOOK.get(tensor)


class _Recorder(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if not any(_BOOK.get(a) is not None for a in inputs):
            return out
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
                _BOOK.add(o, Call(func, args_r, kwargs_r, i if len(outputs) > 1 else None))
        return out


def _as_recipe_arg(value):
    if not isinstance(value, torch.Tensor):
        return value
    recipe = _BOOK.get(value)
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
        return _read(recipe.stored)
    if isinstance(recipe, View):
        part = _whole_part(recipe)
        if part is not None:
            return materialize(part)
        base = materialize(recipe.base)
        return base.as_strided(recipe.size, recipe.stride, recipe.offset)
    assert isinstance(recipe, Call)
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
    strides = [1] * len(out_shape)
    for i in range(len(out_shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * out_shape[i + 1]
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


def _read(stored: StoredTensor) -> torch.Tensor:
    """The tensor's bytes, read from its file (no mapping of the whole file)."""
    data = bytearray(_nbytes(stored))
    try:
        with open(stored.file, "rb") as f:
            f.seek(stored.offset)
            got = f.readinto(data)
    except OSError as e:
        raise SourceError(f"{stored.file}: cannot read tensor {stored.key} ({e})") from e
    if got != len(data):
        raise SourceError(
            f"{stored.file} is truncated: tensor {stored.key} has {got} of its {len(data)} bytes; "
            "download the checkpoint again"
        )
    if not data:
        return torch.empty(stored.shape, dtype=stored.dtype)
    return torch.frombuffer(data, dtype=stored.dtype).reshape(stored.shape)


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
    replaced = []
    fakes: dict[int, torch.Tensor] = {}  # a tied weight stays one tensor
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                recipe = None if tensor is None else recipe_of(tensor)
                if recipe is None:
                    continue
                fake = fakes.get(id(tensor))
                if fake is None:
                    fake = FakeTensor(fake_mode, tensor.data, torch.device("cpu"))
                    if isinstance(tensor, nn.Parameter):
                        fake = nn.Parameter(fake, requires_grad=False)
                    fakes[id(tensor)] = fake
                replaced.append((table, name, tensor))
                table[name] = fake
    try:
        yield recipes
    finally:
        for table, name, tensor in reversed(replaced):
            table[name] = tensor


def real(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` with data: built from its recipe when it is a recorded meta tensor."""
    recipe = None if tensor is None else recipe_of(tensor)
    return tensor if recipe is None else materialize(recipe)


def stream_layers(model: nn.Module) -> None:
    """Hooks on ``model`` (its weights on disk) by which each layer holds real weights only
    while it runs: a layer is an entry of a ModuleList (a decoder layer, with all it holds),
    or any other module for the weights it holds itself (the embedding, a norm, the head)."""
    for unit, whole in _units(model):
        tensors = _recorded(unit, whole)
        if tensors:
            unit.register_forward_pre_hook(_materialize_hook(tensors))
            unit.register_forward_hook(_release_hook(tensors))


def _units(module: nn.Module) -> Iterator[tuple[nn.Module, bool]]:
    if isinstance(module, nn.ModuleList):
        for child in module:
            yield child, True
        return
    yield module, False
    for child in module.children():
        yield from _units(child)


Slot = tuple[dict, str, torch.Tensor]  # a module's _parameters or _buffers, a name, its tensor


def _recorded(unit: nn.Module, whole: bool) -> list[Slot]:
    owners = unit.modules() if whole else [unit]
    return [
        (table, name, t)
        for owner in owners
        for table in (owner._parameters, owner._buffers)
        for name, t in table.items()
        if t is not None and recipe_of(t) is not None
    ]


def _materialize_hook(slots: list[Slot]):
    def hook(module, args):
        built: dict[int, torch.Tensor] = {}  # a tied weight is built once
        for table, name, meta in slots:
            if id(meta) not in built:
                data = materialize(recipe_of(meta))
                is_param = isinstance(meta, nn.Parameter)
                built[id(meta)] = nn.Parameter(data, requires_grad=False) if is_param else data
            table[name] = built[id(meta)]

    return hook


def _release_hook(slots: list[Slot]):
    def hook(module, args, output):
        for table, name, meta in slots:
            table[name] = meta

    return hook
