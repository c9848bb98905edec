"""``generate``: text from a causal-LM artifact with a KV cache, as transformers' ``generate``.

The prompt runs once with an empty past (prefill); then one token per step, the cache
returned by one step fed to the next. Greedy, or sampling with temperature, top-k and top-p
(applied in that order, as transformers' logits warpers are). Batches are left-padded
(``attention_mask`` 0 on padding), positions counted along the mask. The token and mask
buffers are allocated once for the whole sequence, and so are the cache's where the runner
keeps it (`Runner.decode_steps`; ONNX Runtime on the CPU does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from moec.errors import InputError, UsageError
from moec.runtime.arrays import is_torch
from moec.runtime.decoding import Decoding, positions_from_mask

__all__ = ["generate"]

Streamer = Callable[[np.ndarray], Any]


def generate(
    runner,
    input_ids: Any,
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: Any = None,
    streamer: Streamer | None = None,
    seed: int | None = None,
) -> Any:
    """The prompt followed by up to ``max_new_tokens`` new tokens per row ([batch, length];
    a torch tensor for a torch prompt, else a numpy array). Rows that produce an
    ``eos_token_id`` (default: the model's, as transformers reads it; ``[]``: none) continue
    with ``pad_token_id`` (default: the first eos) until every row has;
    ``streamer(tokens [batch])`` receives each step's tokens as they come."""
    decoding: Decoding | None = runner.decoding
    if decoding is None:
        raise UsageError(
            f"{runner.directory} has no KV cache (compiled with --no-kv-cache, or a model "
            "whose cache moec does not capture: see its manifest's notes); compile it again "
            "without --no-kv-cache to generate"
        )
    as_torch = is_torch(input_ids)
    prompt = _tokens(input_ids, "input_ids")
    batch, length = prompt.shape
    if length == 0:
        raise InputError("the prompt is empty (0 tokens); give at least one token per row")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens is {max_new_tokens}; it must be at least 1")
    total = length + max_new_tokens
    if decoding.max_positions is not None and total > decoding.max_positions:
        raise InputError(
            f"{length} prompt tokens + {max_new_tokens} new tokens = {total}, more than the "
            f"model's {decoding.max_positions} positions; shorten the prompt or ask for fewer"
        )
    mask = np.ones((batch, total), dtype=np.int64)
    if attention_mask is not None:
        given = _tokens(attention_mask, "attention_mask")
        if given.shape != prompt.shape or not np.isin(given, (0, 1)).all():
            raise InputError(
                f"attention_mask has shape {list(given.shape)} or values other than 0 and 1; it "
                f"must be 0/1 of the prompt's shape {list(prompt.shape)}"
            )
        if not given.any(axis=1).all():
            raise InputError("attention_mask masks every token of a row; each row needs one")
        mask[:, :length] = given
    eos = _eos(decoding.eos_token_id if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos.size else 0)
    pick = _sampler(do_sample, temperature, top_k, top_p, np.random.default_rng(seed))

    runner.activate()
    run = runner.decode_steps(batch, total)
    tokens = np.empty((batch, total), dtype=np.int64)
    fed_mask = np.empty(batch * total, dtype=np.int64)  # the mask so far, contiguous
    tokens[:, :length] = prompt
    feeds = {
        "input_ids": prompt,
        decoding.mask: np.ascontiguousarray(mask[:, :length]),
        decoding.positions: positions_from_mask(mask[:, :length]),
    }
    feeds = decoding.complete(feeds, runner.manifest.inputs)
    positions = feeds[decoding.positions][:, -1]
    finished = np.zeros(batch, dtype=bool)
    end = length
    for step in range(max_new_tokens):
        outputs = run(feeds)
        chosen = pick(outputs[decoding.logits][:, -1, :].astype(np.float32))
        if eos.size:
            chosen = np.where(finished, pad, chosen)
            finished |= np.isin(chosen, eos)
        tokens[:, end] = chosen
        end += 1
        if streamer is not None:
            streamer(chosen.copy())
        if finished.all() or step == max_new_tokens - 1:
            break
        positions = positions + 1
        so_far = fed_mask[: batch * end].reshape(batch, end)
        so_far[...] = mask[:, :end]
        feeds = decoding.next_step(
            tokens[:, end - 1 : end].copy(), so_far, positions[:, None].copy(), outputs
        )
    result = tokens[:, :end]
    if as_torch:
        import torch

        return torch.from_numpy(result.copy())
    return result


def _tokens(value: Any, name: str) -> np.ndarray:
    if is_torch(value):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise InputError(
            f"{name} must be integers [batch, length] (or [length]); got {array.dtype} "
            f"{list(array.shape)}"
        )
    return array.astype(np.int64)


def _eos(eos_token_id: int | list[int] | None) -> np.ndarray:
    if eos_token_id is None:
        return np.zeros(0, dtype=np.int64)
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    return np.asarray(ids, dtype=np.int64)


def _sampler(do_sample: bool, temperature: float, top_k, top_p, rng: np.random.Generator):
    """logits [batch, vocab] -> the next token per row."""
    if not do_sample:
        return lambda logits: logits.argmax(axis=-1)
    if temperature <= 0:
        raise InputError(f"temperature {temperature} must be > 0 (do_sample=False is greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p {top_p} must be in (0, 1]")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k {top_k} must be at least 1")

    def sample(logits: np.ndarray) -> np.ndarray:
        scores = logits / temperature
        if top_k is not None and top_k < scores.shape[-1]:
            kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        if top_p is not None and top_p < 1:
            order = np.argsort(scores, axis=-1)  # ascending, as transformers' TopPLogitsWarper
            ranked = np.take_along_axis(scores, order, axis=-1)
            drop = np.cumsum(_softmax(ranked), axis=-1) <= 1 - top_p
            drop[:, -1] = False  # the most likely token always stays
            dropped = np.zeros_like(drop)
            np.put_along_axis(dropped, order, drop, axis=-1)
            scores = np.where(dropped, -np.inf, scores)
        probs = _softmax(scores)
        return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)

    return sample


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
