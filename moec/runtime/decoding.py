"""The KV cache of a causal-LM artifact, as its manifest's ``decoding`` section describes it.

`Decoding` names the attention mask, position ids, logits and each layer's past and present
tensors (optimum's names; `moec.models.kv_cache` writes them), and fills the inputs a caller
leaves out: an all-ones mask, positions counted along the mask, and an empty past. So
``m(input_ids)`` runs a cache artifact as it runs one without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moec.errors import ArtifactError, InputError
from moec.ir.signature import TensorSpec, require
from moec.runtime.arrays import is_torch, to_numpy

__all__ = ["CacheLayer", "Decoding", "positions_from_mask"]


@dataclass(frozen=True)
class CacheLayer:
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    kv_heads: int
    key_dim: int
    value_dim: int
    kind: str = "full"  # or "sliding": a window the mask applies, the cache kept whole
    window: int | None = None


@dataclass(frozen=True)
class Decoding:
    mask: str
    positions: str
    logits: str
    layers: tuple[CacheLayer, ...]
    max_positions: int | None = None
    eos_token_id: tuple[int, ...] = ()  # what ends a generation unless generate is told

    @classmethod
    def from_manifest(
        cls, section: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec], where
    ) -> Decoding | None:
        """The section's cache, checked against the inputs and outputs it names."""
        if not section:
            return None
        try:
            names = [section[key] for key in ("mask", "positions", "logits")]
            if not all(isinstance(name, str) for name in names):
                raise TypeError(f"mask, positions and logits must be input names, not {names}")
            layers = tuple(CacheLayer(**layer) for layer in section["layers"])
            for layer in layers:
                tensors = (layer.past_key, layer.past_value, layer.present_key, layer.present_value)
                if not all(isinstance(name, str) for name in tensors):
                    raise TypeError(f"a layer's tensors must be named by strings: {tensors}")
            decoding = cls(
                section["mask"],
                section["positions"],
                section["logits"],
                layers,
                section.get("max_positions"),
                tuple(int(i) for i in section.get("eos_token_id", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: decoding is not a cache description ({e})") from e
        specs = {t.name: t for t in inputs}
        produced = {t.name for t in outputs}
        for name in (decoding.mask, decoding.positions):
            require(name in specs, where, f"decoding names input {name!r}, which it lacks")
        require(decoding.logits in produced, where, f"decoding names no output {decoding.logits}")
        for layer in layers:
            for name in (layer.past_key, layer.past_value):
                require(
                    name in specs and specs[name].rank == 4, where, f"decoding: {name} not [4-d]"
                )
            for name in (layer.present_key, layer.present_value):
                require(name in produced, where, f"decoding names no output {name}")
        return decoding

    @property
    def past_names(self) -> list[str]:
        return [name for layer in self.layers for name in (layer.past_key, layer.past_value)]

    @property
    def present_names(self) -> list[str]:
        return [n for layer in self.layers for n in (layer.present_key, layer.present_value)]

    def next_step(self, tokens, mask, positions, outputs: dict) -> dict[str, Any]:
        """Feeds of the decode step after the one that returned ``outputs``: its new tokens
        [B, 1], the mask so far [B, total], their positions [B, 1], the returned cache as past."""
        feeds = {"input_ids": tokens, self.mask: np.ascontiguousarray(mask)}
        feeds[self.positions] = positions
        for past, present in zip(self.past_names, self.present_names, strict=True):
            feeds[past] = outputs[present]
        return feeds

    def complete(self, feeds: dict[str, Any], specs: list[TensorSpec]) -> dict[str, Any]:
        """``feeds`` with the mask, positions and past filled in where left out (an empty past
        unless one is given: then the mask is needed to say which of it to attend)."""
        missing = [n for n in (self.mask, self.positions, *self.past_names) if n not in feeds]
        if not missing or "input_ids" not in feeds:
            return feeds
        ids = feeds["input_ids"]
        given_past = [n for n in self.past_names if n in feeds]
        shapes = [getattr(feeds[n], "shape", ()) for n in ("input_ids", *given_past)]
        if len(shapes[0]) != 2 or any(len(shape) != 4 for shape in shapes[1:]):
            return feeds  # not what the model takes: check_feeds says what is wrong
        batch, new = int(ids.shape[0]), int(ids.shape[-1])
        if given_past and len(given_past) < len(self.past_names):
            absent = [n for n in self.past_names if n not in feeds]
            raise InputError(f"a past is given for some layers only; missing {absent[:4]}")
        past = int(feeds[given_past[0]].shape[2]) if given_past else 0
        if given_past and self.mask not in feeds:
            raise InputError(
                f"a past of {past} tokens is given without {self.mask!r}: give the mask over "
                "the past and the new tokens (as generate does)"
            )
        dtypes = {s.name: s.dtype for s in specs}
        done = dict(feeds)
        if self.mask not in done:
            done[self.mask] = np.ones((batch, past + new), dtype=dtypes[self.mask])
        if self.positions not in done:
            mask = done[self.mask]
            mask = to_numpy(mask.detach().cpu()) if is_torch(mask) else np.asarray(mask)
            done[self.positions] = positions_from_mask(mask)[:, -new:].astype(
                dtypes[self.positions]
            )
        if not given_past:
            for layer in self.layers:
                for name, dim in (
                    (layer.past_key, layer.key_dim),
                    (layer.past_value, layer.value_dim),
                ):
                    done[name] = np.zeros((batch, layer.kv_heads, 0, dim), dtype=dtypes[name])
        return done


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids of every column of a (left-padded) mask, as transformers counts them:
    attended tokens 0, 1, 2, ...; padding 1."""
    positions = np.cumsum(mask, axis=-1, dtype=np.int64) - 1
    return np.where(mask == 0, 1, positions)
