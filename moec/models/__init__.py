"""Reference MoE models (the zoo) and the adapters that find MoE blocks in a model."""

from __future__ import annotations

from moec.models.adapters import BlockMatch, find_moe_blocks
from moec.models.model_source import ModelSource
from moec.models.zoo import ZOO_BLOCKS, build_zoo, zoo_names

__all__ = ["ZOO_BLOCKS", "BlockMatch", "ModelSource", "build_zoo", "find_moe_blocks", "zoo_names"]
