"""The routing an eager model's MoE blocks chose, recorded while it runs (for verification)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from moec.compiler.moe_block import experts_call_args
from moec.ir import map_experts, near_tie_margin, route, router_logits
from moec.models import BlockMatch
from moec.models.layer_streaming import real

__all__ = ["eager_routing_hooks"]


@contextmanager
def eager_routing_hooks(blocks: dict[str, BlockMatch], routing: dict) -> Iterator[None]:
    """While open, each call of a block of the eager model records its (chosen [..., E],
    near-tie margin [...]) in ``routing`` under the block's name."""

    def hook(match: BlockMatch):
        def record(module, args, kwargs):
            routing[match.name] = _eager_routing(match, args, kwargs)

        return record

    handles = [
        (m.conversion.routing_module or m.module).register_forward_pre_hook(
            hook(m), with_kwargs=True
        )
        for m in blocks.values()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _eager_routing(match: BlockMatch, args: tuple, kwargs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [..., E], near-tie margin [...]) of one block call in the eager model.

    A block routed by moec is routed again from its input with the IR's routing; an experts
    module behind the family's own router reports the routing it was handed (its margin comes
    from `_mark_fragile_external_routing`), and a block routed by its own code the routing its
    gate reader computes.
    """
    spec, w = match.spec, match.weights
    if match.conversion.gate is not None:  # a block routed by its own code, as the op is
        _, ids, _, _ = match.conversion.gate(*args, **kwargs)
    else:
        x, ids, _ = experts_call_args(args, kwargs)
    if spec.routing == "external":
        chosen = torch.zeros((*ids.shape[:-1], spec.router_experts), dtype=torch.bool)
        chosen.scatter_(-1, ids, True)
        _, chosen = map_experts(spec, chosen.float(), chosen)
        return chosen.numpy(), np.full(ids.shape[:-1], np.inf)
    selection_bias = real(w.selection_bias)  # a model streamed by layers: built for the call
    logits = router_logits(x, real(w.router_weight), real(w.router_bias))
    _, chosen = map_experts(spec, *route(spec, logits, selection_bias))
    return chosen.numpy(), near_tie_margin(spec, logits, selection_bias).numpy()
