"""Tiny random models of every MoE family in transformers 5.x, for tests and the coverage table.

``hf_families.json`` maps a family (its directory under ``transformers/models``) to its config
class, model class and config kwargs: 2 layers, hidden <= 64, a few experts, vocab 128. Each was
checked to build and run a forward on CPU. ``NOT_MOE`` lists families that look like MoE to a
text search but do not route tokens to experts.

Families with a DSA-style sparse-attention indexer use ``index_topk = 64`` (every token, at these
lengths), and Qwen4-Exp's QSA indexer ``indexer_budget = 64`` (every key block): with random
weights the indexers' ReLU scores tie exactly, and PyTorch and ONNX Runtime break top-k ties
differently, which has nothing to do with their MoE blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).with_name("hf_families.json")).read_text()
)

# The families the tests compile (test_hf_families, test_decoding); the rest are covered by
# bench/hf_coverage.py (README table).
REQUIRED = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "olmoe",
    "granitemoe",
    "gpt_oss",
    "phimoe",
    "jetmoe",
    "switch_transformers",
    "dbrx",
]

NOT_MOE = {
    "bamba": "no router: num_experts is fixed at 1, a dense SwiGLU MLP",
    "granite_docling": "its 'density router' picks a connector path per image",
    "vitpose_backbone": "a vision backbone whose experts are heads chosen per sample by "
    "dataset_index, not routed per token",
}


def build_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model with random weights drawn from ``seed``, in eval mode."""
    import transformers

    entry = FAMILIES[family]
    config = getattr(transformers, entry["config"])(**entry["kwargs"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, entry["model"])(config)
        for name, p in model.named_parameters():
            routerish = "gate" in name or "router" in name
            if p.dim() == 2 and routerish and float(p.detach().abs().max()) == 0.0:
                torch.nn.init.normal_(p, std=0.02)  # routers initialised to 0 route on ties
    return model.eval()


def save_tiny(family: str, directory: Path, seed: int = 0) -> Path:
    build_tiny(family, seed).save_pretrained(directory)
    return directory


def save_char_tokenizer(directory: Path) -> Path:
    """A character-level tokenizer of printable ASCII (ids 32-126, as the characters' codes;
    0 unknown, 2 end of text) saved beside a tiny model of vocabulary 128."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return directory
