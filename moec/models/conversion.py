"""`Conversion`: what an adapter makes of an MoE block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moec.ir import MoESpec, MoEWeights

__all__ = ["Conversion"]


@dataclass
class Conversion:
    """What an adapter makes of a block. ``(spec, weights)`` tuples are accepted for it too.

    - ``expert_modules``: experts that are not FFNs (``spec.expert_kind == "module"``), run as
      their own exported subgraphs on their tokens;
    - ``stand_in``: for blocks whose experts are called in ways a forward(x) cannot express
      (JetMoE's attention experts), a factory of the module to put in the block's place; it
      must append its routing mask to ``routing_sink`` like `MoEBlock`;
    - ``routing_module``: the module whose input the routing is computed from, when it is not
      the block itself (verification hooks it);
    - ``gate``: for blocks routed by their own code (``routing="external"``), a module called
      like the block that returns ``(hidden [T, H], ids [T, k], weights [T, k], rest)``: the
      op's inputs, and what the block adds to the op's output (and, with
      ``returns_router_logits``, a fifth item: the block's router logits);
    - ``returns_router_logits``: the block returns ``(out [T, H], router_logits [T, E])``
      (Llama 4; Doge's are shaped its own way), so its stand-in does too.
    """

    spec: MoESpec
    weights: MoEWeights
    expert_modules: nn.ModuleList | None = None
    stand_in: Callable[[], nn.Module] | None = None
    routing_module: nn.Module | None = None
    gate: nn.Module | None = None
    returns_router_logits: bool = False
