"""The zoo: moec's reference models by name (``zoo:NAME``), deterministic from a seed.

Blocks (``zoo:mixtral`` ...) take x [B, S, H] float32; language models (``zoo:mixtral-lm`` ...)
take input_ids [B, S] and return logits. Sizes are tiny by default; keyword arguments override
them (``build_zoo("mixtral", hidden=1024, expert_size=3584)``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.export import Dim

from moec.errors import SourceError
from moec.models.model_source import ModelSource
from moec.models.zoo_layers import (
    DeepSeekMoE,
    ExpertChoiceMoE,
    GptOssMoE,
    MixtralMoE,
    QwenMoE,
    SwitchMoE,
)
from moec.models.zoo_lm import TinyMoELM

__all__ = ["ZOO_BLOCKS", "build_zoo", "zoo_names"]

ZOO_BLOCKS: dict[str, type[torch.nn.Module]] = {
    "switch": SwitchMoE,
    "mixtral": MixtralMoE,
    "qwen-moe": QwenMoE,
    "deepseek": DeepSeekMoE,
    "gpt-oss": GptOssMoE,
    "expert-choice": ExpertChoiceMoE,
}
LM_KEYS = ("vocab_size", "layers", "heads", "max_positions")


def utf8_bytes(text: str) -> list[int]:
    """The zoo LMs' tokenizer: one token per UTF-8 byte."""
    return list(text.encode("utf-8"))


def zoo_names() -> list[str]:
    return [*ZOO_BLOCKS, *(f"{name}-lm" for name in ZOO_BLOCKS)]


def build_zoo(name: str, seed: int = 0, batch: int = 2, seq: int = 8, **sizes: Any) -> ModelSource:
    """Build zoo model ``name`` with weights drawn from ``seed``, in eval mode."""
    is_lm = name.endswith("-lm")
    block = ZOO_BLOCKS.get(name.removesuffix("-lm"))
    if block is None:
        raise SourceError(f"zoo:{name} is not a zoo model; choose one of {zoo_names()}")
    lm_sizes = {k: sizes.pop(k) for k in LM_KEYS if k in sizes}
    hidden = sizes.pop("hidden", 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_lm:
            make_moe = functools.partial(_make_block, block, sizes)
            model = TinyMoELM(make_moe, hidden=hidden, **lm_sizes).eval()
            ids = torch.randint(0, model.vocab_size, (batch, seq))
            return ModelSource(
                model=model,
                example_inputs=(ids,),
                input_names=["input_ids"],
                dynamic_shapes=(
                    {0: Dim("batch"), 1: Dim("sequence_length", max=model.max_positions)},
                ),
                output_names=["logits"],
                input_ranges={"input_ids": (0, model.vocab_size)},
                tokenizer=utf8_bytes if model.vocab_size >= 256 else None,
            )
        model = _make_block(block, sizes, hidden).eval()
        x = torch.randn(batch, seq, hidden)
    return ModelSource(
        model=model,
        example_inputs=(x,),
        input_names=["x"],
        dynamic_shapes=({0: Dim("batch"), 1: Dim("sequence_length")},),
        output_names=["output"],
    )


def _make_block(block: type[torch.nn.Module], sizes: dict[str, Any], hidden: int):
    try:
        return block(hidden=hidden, **sizes)
    except TypeError as e:
        raise SourceError(f"zoo block {block.__name__}: {e}") from e
