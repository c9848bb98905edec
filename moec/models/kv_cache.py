"""Causal LMs with their KV cache as inputs and outputs, in optimum's convention.

`with_kv_cache` turns a transformers causal-LM source (`CausalLMLogits`) or a zoo LM
(`TinyMoELM`) into one whose program takes and returns the cache:

- inputs ``input_ids [batch, sequence_length]``, ``attention_mask [batch,
  total_sequence_length]`` (past + new, 0 on left padding), ``position_ids [batch,
  sequence_length]``, and per layer ``past_key_values.{i}.key`` / ``.value`` ``[batch,
  kv_heads, past_sequence_length, head_dim]`` (length 0 on the first step);
- outputs ``logits``, then ``present.{i}.key`` / ``.value`` (past + new).

The layout is read off the cache the model itself builds on one call, so it is each family's
own (DeepSeek's MLA caches keys and values of different head dims; sliding-window layers are
kept whole, their window applied by the attention mask). Families whose cache holds more than
keys and values (Mamba or linear-attention layers) are not captured with a cache: the reason
is returned and the source compiles without one.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from moec.models.adapters import find_moe_blocks
from moec.models.hf_models import CausalLMLogits, Seq2SeqLMLogits
from moec.models.model_source import ModelSource
from moec.models.zoo_lm import TinyMoELM

Probe = Callable[[nn.Module], AbstractContextManager]

__all__ = [
    "CausalLMWithCache",
    "TinyLMWithCache",
    "cache_keyword",
    "cache_model",
    "with_kv_cache",
]

PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"
EXAMPLE_PAST = 5


class CausalLMWithCache(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present); past and present
    alternate key and value per layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cache_keyword = cache_keyword(model)
        parameters = inspect.signature(model.forward).parameters
        self.flags = {"use_cache": True} if "use_cache" in parameters else {}

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = _filled_cache(past)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **self.flags,
            **{self.cache_keyword: cache},
        )
        present = []
        for layer in _returned_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _filled_cache(past) -> Any:
    """A DynamicCache holding ``past`` (key, value, key, ...) as it is. DynamicCache's own
    constructor concatenates each past onto an empty tensor: a copy of the whole cache in the
    graph on every step."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(None, None)] * (len(past) // 2))
    for layer, key, value in zip(cache.layers, past[0::2], past[1::2], strict=True):
        layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
    return cache


def cache_keyword(model: nn.Module) -> str | None:
    """``cache`` (transformers >= 5.2x), or ``past_key_values`` where a forward still takes it;
    None for a forward that takes neither."""
    parameters = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in parameters), None)


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class TinyLMWithCache(TinyMoELM):
    """A zoo LM whose forward is `TinyMoELM.forward_cached`: the same modules under the same
    names (`cache_model` makes one), so its blocks are named as the LM's."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return self.forward_cached(input_ids, attention_mask, position_ids, *past)


def cache_model(model: nn.Module) -> nn.Module | None:
    """``model`` (a source's model, as `with_kv_cache` takes it) with its cache as inputs and
    outputs, or None for a model of another kind."""
    if isinstance(model, CausalLMLogits):
        return CausalLMWithCache(model.model).eval()
    if isinstance(model, TinyMoELM):
        cached = copy.copy(model)  # shares the modules
        cached.__class__ = TinyLMWithCache
        return cached
    return None


def with_kv_cache(
    source: ModelSource, probe: Probe = nullcontext
) -> tuple[ModelSource | None, dict | None, str | None]:
    """(the source with its cache, the manifest's ``decoding`` section, None), or (None, None,
    why not) for a causal LM whose cache moec does not capture; (None, None, None) for a model
    that is not a causal LM moec knows. ``probe(model)``: the context the call that shows the
    cache's layout runs in (a model whose weights are on disk runs it on fake tensors)."""
    model = source.model
    if isinstance(model, Seq2SeqLMLogits):
        return None, None, "an encoder-decoder: moec does not capture its decoder's cache yet"
    zoo_lm = isinstance(model, TinyMoELM) and len(source.example_inputs) == 1
    generates = isinstance(model, CausalLMLogits) and len(source.example_inputs) == 2
    if not (zoo_lm or (generates and getattr(model.model, "can_generate", lambda: False)())):
        return None, None, None  # a classifier, a block: nothing to generate
    why = _non_causal_routing(model)
    if why:
        return None, None, why
    if zoo_lm:
        (ids,) = source.example_inputs
        heads = model.layers[0].attn.heads
        head_dim = model.embed.embedding_dim // heads
        layer = {"kind": "full", "kv_heads": heads, "key_dim": head_dim, "value_dim": head_dim}
        layers = [{**layer, "dtype": model.embed.weight.dtype} for _ in model.layers]
        return _cached(source, model, ids, layers, model.max_positions, [])
    if cache_keyword(model.model) is None:
        return None, None, f"{type(model.model).__name__}.forward takes no KV cache"
    ids, mask = source.example_inputs
    layers, why = _cache_layout(model.model, ids, mask, probe)
    if layers is None:
        return None, None, why
    max_positions = source.dynamic_shapes[0][1].max
    max_positions = max_positions if isinstance(max_positions, int) else None
    return _cached(source, model, ids, layers, max_positions, _eos_ids(model.model))


def _ids_range(source: ModelSource, model) -> tuple[int, int]:
    """The valid token ids: as the source declares them (under any name it gave its one id
    input), else the model's vocabulary (a module compiled without ``input_ranges``)."""
    declared = source.input_ranges.get("input_ids")
    if declared is None and source.input_names:
        declared = source.input_ranges.get(source.input_names[0])
    if declared is not None:
        return declared
    embeddings = model.embed if isinstance(model, TinyMoELM) else None
    if embeddings is None:
        embeddings = model.model.get_input_embeddings()
    return (0, embeddings.num_embeddings)


def _cached(source: ModelSource, model, ids, layers: list[dict], max_positions, eos: list[int]):
    """`with_kv_cache`'s answer for ``model`` with cache ``layers``."""
    batch, new = ids.shape
    total = EXAMPLE_PAST + new
    g = torch.Generator().manual_seed(1)
    past = []
    for layer in layers:
        for dim in ("key_dim", "value_dim"):
            shape = (batch, layer["kv_heads"], EXAMPLE_PAST, layer[dim])
            past.append(torch.randn(shape, generator=g, dtype=layer["dtype"]))
    positions = torch.arange(EXAMPLE_PAST, total).expand(batch, new).contiguous()
    example = (ids, torch.ones(batch, total, dtype=torch.int64), positions, *past)
    # unbounded for export (bounds would meet torch's 0/1 specialisation of the past); the
    # manifest declares the model's (dim_bounds)
    b, s, p = Dim("batch"), Dim("sequence_length"), Dim("past_sequence_length")
    t = Dim("total_sequence_length")
    last = None if max_positions is None else max_positions - 1
    names = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(len(layers)):
        names += [PAST_KEY.format(i), PAST_VALUE.format(i)]
        outputs += [PRESENT_KEY.format(i), PRESENT_VALUE.format(i)]
    cached = ModelSource(
        model=cache_model(model),
        example_inputs=example,
        input_names=names,
        dynamic_shapes=({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, *({0: b, 2: p} for _ in past)),
        output_names=outputs,
        input_ranges={
            "input_ids": _ids_range(source, model),
            "attention_mask": (0, 2),
            "position_ids": (0, max_positions or 2**31),
        },
        tokenizer=source.tokenizer,
        roles={"attention_mask": "mask", **{n: "cache" for n in names[3:] + outputs[1:]}},
        dim_bounds={
            "sequence_length": (1, max_positions),
            "past_sequence_length": (0, last),
            "total_sequence_length": (1, max_positions),
        },
        dim_sums={"total_sequence_length": ("past_sequence_length", "sequence_length")},
    )
    decoding = {
        "mask": "attention_mask",
        "positions": "position_ids",
        "logits": "logits",
        "max_positions": max_positions,
        "eos_token_id": eos,
        "layers": [
            {
                "past_key": PAST_KEY.format(i),
                "past_value": PAST_VALUE.format(i),
                "present_key": PRESENT_KEY.format(i),
                "present_value": PRESENT_VALUE.format(i),
                **{k: v for k, v in layer.items() if k != "dtype"},
            }
            for i, layer in enumerate(layers)
        ],
    }
    return cached, decoding, None


def _non_causal_routing(model: nn.Module) -> str | None:
    """Why a cache would change the model's outputs: a block whose routing of a token depends
    on the tokens after it (expert choice, expert capacity), or None."""
    for match in find_moe_blocks(model):
        spec = match.spec
        if spec.routing == "expert_choice" or spec.has_capacity:
            how = "by expert choice" if spec.routing == "expert_choice" else "with expert capacity"
            return (
                f"block {match.name} routes {how}: whether a token reaches an expert depends on "
                "the tokens after it, so decoding token by token would not give the full pass's "
                "outputs"
            )
    return None


def _eos_ids(model: nn.Module) -> list[int]:
    """The token ids that end a generation, as transformers' ``generate`` reads them."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return [int(i) for i in ids]


def _cache_layout(
    model: nn.Module, ids, mask, probe: Probe
) -> tuple[list[dict] | None, str | None]:
    """Per layer: kv_heads, key_dim, value_dim, kind (and the window of a sliding layer), from
    the cache the model builds on one call; or None and why."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    with torch.no_grad():
        flags = (
            {"use_cache": True}
            if "use_cache" in inspect.signature(model.forward).parameters
            else {}
        )
        try:
            with probe(model):
                out = model(input_ids=ids, attention_mask=mask, **flags)
        except Exception as e:  # a family's forward may reject anything; say which
            return None, f"{type(model).__name__} fails a call with use_cache=True ({e})"[:300]
    cache = _returned_cache(out)
    if not isinstance(cache, DynamicCache):
        kind = type(cache).__name__
        return None, f"{type(model).__name__} returns a {kind} cache, not a DynamicCache"
    plain = (DynamicLayer, DynamicSlidingWindowLayer)  # subclasses keep more (an indexer's keys)
    others = sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in plain})
    if others:
        return None, (
            f"{type(model).__name__}'s cache holds {', '.join(others)} layers, not plain keys "
            "and values"
        )
    layers = []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        if keys is None or keys.dim() != 4 or values.dim() != 4:
            return None, f"{type(model).__name__}'s cache layers are not [batch, heads, seq, dim]"
        entry = {
            "kind": "sliding" if type(layer) is DynamicSlidingWindowLayer else "full",
            "kv_heads": int(keys.shape[1]),
            "key_dim": int(keys.shape[-1]),
            "value_dim": int(values.shape[-1]),
            "dtype": keys.dtype,
        }
        if entry["kind"] == "sliding":
            entry["window"] = int(layer.sliding_window)
        layers.append(entry)
    return layers, None
