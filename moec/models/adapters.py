"""Adapters find MoE blocks in a model and convert each to the IR (`MoESpec` + `MoEWeights`).

An adapter is any object with a ``name`` and ``convert(module)`` returning None (not a block it
knows), ``(MoESpec, MoEWeights)``, or a `Conversion` (which can also carry expert modules, a
stand-in module or the routing module). It raises `UnsupportedBlockError` for a block it
recognises but cannot convert, with the reason.

Built in, tried in this order: modules with a ``to_moe()`` method (moec's zoo layers, or a user's
own blocks); transformers' fused experts modules (`HFExpertsAdapter`); family adapters
(rank-1 experts retrieved by product keys, Doge: `ProductKeyMoEAdapter`); blocks
whose routing weights scale their experts' inputs (`InputGatedMoEAdapter`, Llama 4); the generic
recogniser of a router Linear plus a ModuleList of experts (`GenericMoEAdapter`), and of such
blocks whose forward takes more than the hidden states (`OwnGateAdapter`). `register_adapter`
puts a new one first. A block an adapter refuses stays the model's own ops; ``find_moe_blocks``
says why in ``refused``. See docs/adapters.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from moec.errors import SpecError, UnsupportedBlockError
from moec.ir import MoESpec, MoEWeights
from moec.models.conversion import Conversion
from moec.models.generic_moe import GenericMoEAdapter
from moec.models.hf_experts import HFExpertsAdapter
from moec.models.hf_families import DbrxExpertsAdapter, JetMoeAdapter, SwitchSparseMLPAdapter
from moec.models.hf_nllb_moe import NllbMoeAdapter
from moec.models.input_gated_moe import InputGatedMoEAdapter
from moec.models.own_gate_moe import OwnGateAdapter
from moec.models.product_key_moe import ProductKeyMoEAdapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BlockMatch",
    "Conversion",
    "find_moe_blocks",
    "register_adapter",
]


class Adapter(Protocol):
    name: str

    def convert(self, module: nn.Module) -> Conversion | tuple | None: ...


@dataclass
class BlockMatch:
    """One MoE block found in a model: where it is, and its IR form."""

    name: str  # qualified module name; "" for the model itself
    module: nn.Module
    adapter: str
    conversion: Conversion

    @property
    def spec(self) -> MoESpec:
        return self.conversion.spec

    @property
    def weights(self) -> MoEWeights:
        return self.conversion.weights

    @property
    def expert_modules(self) -> nn.ModuleList | None:
        return self.conversion.expert_modules


class ToMoEAdapter:
    """Modules that convert themselves: ``module.to_moe() -> (MoESpec, MoEWeights)``."""

    name = "to_moe"

    def convert(self, module: nn.Module) -> tuple[MoESpec, MoEWeights] | None:
        to_moe = getattr(module, "to_moe", None)
        return to_moe() if callable(to_moe) else None


ADAPTERS: list[Adapter] = [
    ToMoEAdapter(),
    HFExpertsAdapter(),
    DbrxExpertsAdapter(),
    SwitchSparseMLPAdapter(),
    JetMoeAdapter(),
    NllbMoeAdapter(),
    ProductKeyMoEAdapter(),
    InputGatedMoEAdapter(),
    GenericMoEAdapter(),
    OwnGateAdapter(),
]


def register_adapter(adapter: Adapter) -> None:
    """Try ``adapter`` before the ones already registered."""
    ADAPTERS.insert(0, adapter)


def find_moe_blocks(model: nn.Module, refused: dict[str, str] | None = None) -> list[BlockMatch]:
    """Every MoE block of ``model``, outermost first; a block's own submodules are not searched.
    A block an adapter recognises but cannot convert is left out (it runs as the model's own
    ops), and ``refused`` maps its name to the adapter's reason."""
    found: list[BlockMatch] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") or outer == "" for outer in inside):
            continue
        try:
            match = _convert(name, module)
        except UnsupportedBlockError as e:
            if refused is not None:
                refused[name] = str(e)
            inside.append(name)
            continue
        if match is not None:
            found.append(match)
            inside.append(name)
    return found


def _convert(name: str, module: nn.Module) -> BlockMatch | None:
    for adapter in ADAPTERS:
        try:
            converted = adapter.convert(module)
        except (SpecError, UnsupportedBlockError) as e:
            where = name or "the model"
            raise type(e)(f"MoE block {where} ({type(module).__name__}): {e}") from e
        if converted is None:
            continue
        if not isinstance(converted, Conversion):
            converted = Conversion(*converted)
        try:
            converted.weights.check(converted.spec)
        except SpecError as e:
            raise SpecError(
                f"adapter {adapter.name} converted {name or 'the model'} "
                f"({type(module).__name__}) inconsistently: {e}"
            ) from e
        return BlockMatch(name, module, adapter.name, converted)
    return None
