"""`ModelSource`: a model together with what moec needs to capture it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["ModelSource"]


@dataclass
class ModelSource:
    """What a zoo entry or a ``pkg.module:factory`` gives moec.

    - ``example_inputs``: positional inputs for one forward call (tensors).
    - ``input_names``: one per example input (default: the forward's parameter names).
    - ``dynamic_shapes``: as for `torch.export.export` (default: dims 0 and 1 of every input of
      rank >= 2 are dynamic, batch and sequence).
    - ``output_names``: names of the model's outputs (default ``output``, ``output_1``, ...).
    - ``input_ranges``: for integer inputs, the half-open range [low, high) of valid values
      (token ids: [0, vocab)); verification draws random inputs from it.
    - ``tokenizer``: text -> token ids of the first input, for calibration text files.
    - ``roles``: an input or output's role when not ``main`` (``mask``, ``cache``: `TensorSpec`).
    - ``dim_bounds``: [min, max] of named dynamic dims as the artifact declares them, where
      they are not what torch.export finds (an empty past; bounds left out of the export,
      where torch would narrow them by its 0/1 specialisation).
    - ``dim_sums``: named dynamic dims that are the sum of others (past + new tokens).
    """

    model: nn.Module
    example_inputs: tuple[Any, ...]
    input_names: list[str] | None = None
    dynamic_shapes: Any = None
    output_names: list[str] | None = None
    input_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    tokenizer: Callable[[str], list[int]] | None = None
    roles: dict[str, str] = field(default_factory=dict)
    dim_bounds: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    dim_sums: dict[str, tuple[str, ...]] = field(default_factory=dict)
