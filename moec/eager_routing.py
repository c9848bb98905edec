"""The routing an eager model's MoE blocks chose, recorded while it runs (for verification)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from moec.compiler.moe_block import experts_call_args
from moec.ir import map_experts, near_tie_margin, route, router_logits
from moec.models import BlockMatch
from moec.models.layer_streaming import real

__all__ = [
    "PERTURBATION",
    "PERTURBATION_SIGNS",
    "call_key",
    "eager_routing_hooks",
    "external_blocks",
    "mark_flips",
    "perturbed_blocks",
    "perturbed_routings",
    "routing_keys",
]


def call_key(block: str, call: int) -> str:
    """The routing key of a block's ``call``-th call (from 0) in one forward: a block the model
    runs several times (a looped layer) routes each call anew."""
    return block if call == 0 else f"{block}#{call + 1}"


def routing_keys(specs) -> list[str]:
    """The `call_key` of each routing output, in order (the outputs of one block are its calls,
    in the order it ran)."""
    calls: Counter[str] = Counter()
    keys = []
    for spec in specs:
        keys.append(call_key(spec.block, calls[spec.block]))
        calls[spec.block] += 1
    return keys


@contextmanager
def eager_routing_hooks(blocks: dict[str, BlockMatch], routing: dict) -> Iterator[None]:
    """While open, each call of a block of the eager model records its (chosen [..., E],
    near-tie margin [...]) in ``routing`` under its `call_key`."""
    calls: Counter[str] = Counter()

    def hook(match: BlockMatch):
        def record(module, args, kwargs):
            routing[call_key(match.name, calls[match.name])] = _eager_routing(match, args, kwargs)
            calls[match.name] += 1

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
    from `mark_flips`), and a block routed by its own code the routing its gate reader
    computes.
    """
    spec, w = match.spec, match.weights
    if match.conversion.gate is not None:  # a block routed by its own code, as the op is
        _, ids, *_ = match.conversion.gate(*args, **kwargs)
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


PERTURBATION = 1e-5  # relative noise that marks an external routing decision as a near-tie
# the noise and its negation: an exact tie moves one way under one and the other way under the
# other, so one of them flips it whichever side the reference took (one draw misses some)
PERTURBATION_SIGNS = (1.0, -1.0)


def external_blocks(blocks: dict[str, BlockMatch]) -> dict[str, BlockMatch]:
    """The blocks routed by the family's own router (whose margin moec cannot compute)."""
    return {n: m for n, m in blocks.items() if m.spec.routing == "external"}


@contextmanager
def perturbed_blocks(
    model: torch.nn.Module, blocks: dict[str, BlockMatch], sign: float = 1.0
) -> Iterator[None]:
    """While open, the input of each block's parent (of the block itself, for one routed by its
    own code) gets ``PERTURBATION`` noise relative to its mean magnitude; an all-zero input (a
    zero pad embedding, through every layer of a one-token call) gets it absolute, as its
    router's logits tie exactly. ``sign`` -1: the same draws negated (`PERTURBATION_SIGNS`)."""
    generator = torch.Generator().manual_seed(0)

    def add_noise(module, args, kwargs):
        if args and args[0].is_floating_point():
            x = args[0]
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            scale = float(x.abs().mean()) or 1.0
            return (x + sign * PERTURBATION * scale * noise, *args[1:]), kwargs
        return None

    parents = {
        model.get_submodule(name if m.conversion.gate is not None else name.rpartition(".")[0])
        for name, m in blocks.items()
    }
    handles = [p.register_forward_pre_hook(add_noise, with_kwargs=True) for p in parents]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def perturbed_routings(model: torch.nn.Module, blocks: dict[str, BlockMatch], forward) -> list:
    """Per sign of `PERTURBATION_SIGNS`, the routing of ``blocks`` (`eager_routing_hooks`) in
    one ``forward()`` of ``model`` with their inputs perturbed (`perturbed_blocks`)."""
    runs: list[dict] = []
    for sign in PERTURBATION_SIGNS:
        runs.append({})
        hooks = eager_routing_hooks(blocks, runs[-1])
        with perturbed_blocks(model, blocks, sign), hooks, torch.no_grad():
            forward()
    return runs


def mark_flips(routing: dict, perturbed: list[dict]) -> None:
    """Give the tokens of each block whose choice flipped under any of the `perturbed_blocks`
    runs in ``perturbed`` (one routing dict per run) a zero margin (near-ties), the others an
    infinite one."""
    for name in routing.keys() & set().union(*(run.keys() for run in perturbed)):
        chosen, _ = routing[name]
        flipped = np.zeros(chosen.shape[:-1], dtype=bool)
        for run in perturbed:
            if name in run:
                flipped |= (run[name][0] != chosen).any(axis=-1)
        routing[name] = (chosen, np.where(flipped, 0.0, np.inf))
