"""Verification of decoding: a cache artifact against the eager model, step by step.

A left-padded batch of random prompts runs once (prefill), then `DECODE_STEPS` steps, each
feeding both sides the token the eager model chose (so they see the same text even where a
near-tie would make them differ), the artifact its own returned cache, the eager model
transformers' cache (a zoo LM: every token so far again, without a cache). Per step:
relative L2 of the logits of attended tokens, and routing agreement per block (a block behind
the family's own router: its near-ties are the tokens that flip when its input is perturbed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from moec.eager_routing import (
    eager_routing_hooks,
    external_blocks,
    mark_flips,
    perturbed_routings,
    routing_keys,
)
from moec.models.kv_cache import CausalLMWithCache, TinyLMWithCache, cache_keyword
from moec.runtime.compare import OutputStats, RoutingStats
from moec.runtime.decoding import positions_from_mask

__all__ = ["DECODE_STEPS", "DecodeStep", "verify_decoding"]

DECODE_STEPS = 8
PROMPT = (2, 6)  # batch, length; the second row left-padded by 2


@dataclass
class DecodeStep:
    step: int  # 0: prefill
    tokens: int  # fed this step (attended)
    logits: OutputStats
    routing: list[RoutingStats] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.logits.passed and all(r.passed for r in self.routing)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "logits_rel_l2": self.logits.rel_l2,
            "tolerance": self.logits.tolerance,
            "routing_agreement": min((r.agreement for r in self.routing), default=1.0),
            "passed": self.passed,
        }


def verify_decoding(
    runner, model: CausalLMWithCache | TinyLMWithCache, blocks: dict, routing_specs,
    rel_l2: float, least: float, near_tie: float, seed: int = 0,
) -> list[DecodeStep]:  # fmt: skip
    """The steps of one prefill and `DECODE_STEPS` decode steps (module docstring)."""
    decoding = runner.decoding
    low, high = next(s.value_range for s in runner.manifest.inputs if s.name == "input_ids")
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, high, PROMPT, dtype=np.int64)
    total = PROMPT[1] + DECODE_STEPS
    mask = np.ones((PROMPT[0], total), dtype=np.int64)
    mask[1, :2] = 0
    tokens = np.zeros((PROMPT[0], total), dtype=np.int64)
    tokens[:, : PROMPT[1]] = ids
    feeds = decoding.complete(
        {
            "input_ids": ids,
            decoding.mask: mask[:, : PROMPT[1]].copy(),
            decoding.positions: positions_from_mask(mask[:, : PROMPT[1]]),
        },
        runner.manifest.inputs,
    )
    cache, steps, end = None, [], PROMPT[1]
    for step in range(DECODE_STEPS + 1):
        outputs = runner.infer(feeds)
        routing: dict = {}
        fragile = _fragile_external_routing(model, blocks, feeds, decoding, tokens[:, :end], cache)
        with eager_routing_hooks(blocks, routing), torch.no_grad():
            ref_logits, cache = _eager_step(model, feeds, decoding, tokens[:, :end], cache)
        mark_flips(routing, fragile)
        attended = feeds[decoding.mask][:, -feeds["input_ids"].shape[1] :].astype(bool)
        logits = OutputStats(f"logits, step {step}", rel_l2)
        logits.update(ref_logits[attended], outputs[decoding.logits][attended])
        checks = []
        for spec, key in zip(routing_specs, routing_keys(routing_specs), strict=True):
            if key not in routing:
                continue
            chosen, margin = routing[key]
            stats = RoutingStats(key, spec.name, least, near_tie=near_tie)
            batch, new, width = *attended.shape, chosen.shape[-1]
            stats.update(  # the eager side may have routed every token so far: the new ones
                chosen.reshape(batch, -1, width)[:, -new:][attended],
                outputs[spec.name].reshape(batch, new, width)[attended],
                margin.reshape(batch, -1)[:, -new:][attended],
            )
            checks.append(stats)
        steps.append(DecodeStep(step, int(attended.sum()), logits, checks))
        if step == DECODE_STEPS:
            break
        chosen_tokens = ref_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens[:, end] = chosen_tokens[:, 0]
        end += 1
        positions = positions_from_mask(mask[:, :end])[:, -1:]
        feeds = decoding.next_step(chosen_tokens, mask[:, :end], positions, outputs)
    return steps


def _fragile_external_routing(model, blocks: dict, feeds: dict, decoding, tokens, cache) -> list:
    """`perturbed_routings` of the blocks routed by the family's own router in this step, run
    on a copy of the cache: tokens it flips are near-ties."""
    external = external_blocks(blocks)
    if not external:
        return []

    def step():
        _eager_step(model, feeds, decoding, tokens, copy.deepcopy(cache))

    return perturbed_routings(model, external, step)


def _eager_step(model, feeds: dict, decoding, tokens: np.ndarray, cache):
    """(logits of the step's new tokens, the cache for the next step) from the eager model:
    transformers with its own cache, or a zoo LM recomputing every token so far."""
    new = feeds["input_ids"].shape[1]
    mask = feeds[decoding.mask]
    if isinstance(model, CausalLMWithCache):
        keyword = cache_keyword(model.model)
        out = model.model(
            input_ids=torch.from_numpy(feeds["input_ids"]),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(feeds[decoding.positions]),
            use_cache=True,
            **({keyword: cache} if cache is not None else {}),
        )
        cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits.float().numpy(), cache
    empty = [
        torch.zeros(tokens.shape[0], layer.kv_heads, 0, dim)
        for layer in decoding.layers
        for dim in (layer.key_dim, layer.value_dim)
    ]
    positions = torch.from_numpy(positions_from_mask(mask))
    logits = model(torch.from_numpy(tokens), torch.from_numpy(mask), positions, *empty)[0]
    return logits[:, -new:].float().numpy(), None
