"""A model whose weights are on disk (`moec.models.lazy_weights`), run a layer at a time: each
layer reads its weights when it runs and drops them after, so the eager reference of a model
bigger than memory holds one decoder layer at a time.

Between its calls a layer's weights are meta tensors. Model code that moves its input to a
layer's device before calling it (Llama 4: ``input_ids.to(self.embed_tokens.weight.device)``)
would move it to the meta device and lose it; while the model runs, such moves leave the
tensor where it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moec.models.lazy_weights import Slot, materialize, recipe_of, recorded_slots

__all__ = ["materialized", "real", "stream_layers"]


def real(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` with data: built from its recipe when it is a recorded meta tensor."""
    recipe = None if tensor is None else recipe_of(tensor)
    return tensor if recipe is None else materialize(recipe)


@contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """While open, ``module`` (and all it holds) has real weights in place of recorded ones."""
    slots = recorded_slots(module.modules())
    _materialize_hook(slots)(module, ())
    try:
        yield module
    finally:
        _release_hook(slots)(module, (), None)


def stream_layers(model: nn.Module) -> None:
    """Hooks on ``model`` (its weights on disk) by which each layer holds real weights only
    while it runs: a layer is an entry of a ModuleList (a decoder layer, with all it holds),
    or any other module for the weights it holds itself (the embedding, a norm, the head)."""
    for unit, whole in _units(model):
        tensors = recorded_slots(unit.modules() if whole else [unit])
        if tensors:
            unit.register_forward_pre_hook(_materialize_hook(tensors))
            unit.register_forward_hook(_release_hook(tensors))
    for module in model.modules():  # wherever a forward may start: any module with children
        if next(module.children(), None) is not None:
            _stay_off_meta_while_running(module)


def _units(module: nn.Module) -> Iterator[tuple[nn.Module, bool]]:
    if isinstance(module, nn.ModuleList):
        for child in module:
            yield child, True
        return
    yield module, False
    for child in module.children():
        yield from _units(child)


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


def _stay_off_meta_while_running(module: nn.Module) -> None:
    modes: list[_StayOffMeta] = []  # a stack: a module may run inside itself
    module.register_forward_pre_hook(lambda m, args: modes.append(_StayOffMeta().__enter__()))
    module.register_forward_hook(
        lambda m, args, output: modes.pop().__exit__(None, None, None), always_call=True
    )


class _StayOffMeta(TorchFunctionMode):
    """``x.to(...)`` of real data onto the meta device (a released weight's) keeps ``x`` on
    its own device, converted to the dtype asked for."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.to and out.device.type == "meta" and not args[0].is_meta:
            return args[0].to(out.dtype)
        return out
