"""Edits of a loaded program's graph (``ExportedProgram.module()``) shared by the torch
runtime's load-time rewrites: weight packing and expert-parallel sharding."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn

__all__ = ["attribute", "call_module_instead"]


def attribute(module: nn.Module, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` node's target names."""
    return getattr(*_owner(module, target))


def call_module_instead(
    module: fx.GraphModule,
    node: fx.Node,
    name: str,
    replacement: nn.Module,
    args: Iterable,
    weights: Iterable[fx.Node | None],
) -> None:
    """Call ``replacement`` (added as submodule ``name``) with ``args`` in place of ``node``,
    and drop the stored ``weights`` (``get_attr`` nodes) nothing reads any more."""
    module.add_submodule(name, replacement)
    with module.graph.inserting_before(node):
        call = module.graph.call_module(name, tuple(args))
    node.replace_all_uses_with(call)
    module.graph.erase_node(node)
    for weight in weights:
        if weight is not None and not weight.users:
            module.graph.erase_node(weight)
            delattr(*_owner(module, weight.target))


def _owner(module: nn.Module, target: str) -> tuple[nn.Module, str]:
    owner_path, _, attr = target.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), attr
