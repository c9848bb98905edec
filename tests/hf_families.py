"""Tiny random models of every MoE family in transformers 5.x, for tests and the coverage table.

``hf_families.json`` maps a family (its directory under ``transformers/models``) to its config
class, model class and config kwargs: 2 layers, hidden <= 64, a few experts, vocab 128. Each was
checked to build and run a forward on CPU. ``NOT_MOE`` lists families that look like MoE to a
text search but do not route tokens to experts.

With random weights a DSA-style indexer's ReLU scores tie exactly (at 0) when it has few heads,
and PyTorch and ONNX Runtime break top-k ties differently (measured in docs/coverage.md).
deepseek_v32 uses ``index_topk = 4`` with 8 indexer heads, which leave no ties; the other
indexer families use ``index_topk = 64`` (every token, at these lengths), and Qwen4-Exp's QSA
indexer ``indexer_budget = 64`` (every key block).
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


# The second config of a family (bench/hf_coverage.py): every window, block, chunk and indexer
# top-k of the config at most SMALL, below the sequences verify runs (13 and 32 tokens), and
# other random weights.
SMALL = 4
SIZE_KEYS = (
    "sliding_window",
    "sliding_window_size",
    "attention_chunk_size",
    "chunk_size",
    "mamba_chunk_size",
    "block_size",
    "keep_window_size",
    "index_topk",
)
SECOND_SEED = 1
INDEX_HEADS = 8  # indexer heads of a second config whose indexer top-k is cut to SMALL


def second_config_kwargs(family: str) -> dict[str, Any]:
    """The family's config kwargs with every size of SIZE_KEYS above SMALL set to SMALL."""
    import transformers

    entry = FAMILIES[family]
    config = getattr(transformers, entry["config"])(**entry["kwargs"])
    kwargs = dict(entry["kwargs"])
    for key in SIZE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > SMALL:
            kwargs[key] = SMALL
    if "index_topk" in kwargs and getattr(config, "index_n_heads", INDEX_HEADS) < INDEX_HEADS:
        kwargs["index_n_heads"] = INDEX_HEADS  # fewer tie at the top-k (docs/coverage.md)
    return kwargs


def build_tiny(family: str, seed: int = 0, second: bool = False) -> torch.nn.Module:
    """The family's tiny model with random weights drawn from ``seed``, in eval mode; with
    ``second``, its second config (`second_config_kwargs`) and weights from SECOND_SEED."""
    import transformers

    entry = FAMILIES[family]
    kwargs = second_config_kwargs(family) if second else entry["kwargs"]
    seed = SECOND_SEED if second else seed
    config = getattr(transformers, entry["config"])(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, entry["model"])(config)
        for name, p in model.named_parameters():
            routerish = "gate" in name or "router" in name
            if p.dim() == 2 and routerish and float(p.detach().abs().max()) == 0.0:
                torch.nn.init.normal_(p, std=0.02)  # routers initialised to 0 route on ties
    return model.eval()


def save_tiny(family: str, directory: Path, seed: int = 0, second: bool = False) -> Path:
    build_tiny(family, seed, second).save_pretrained(directory)
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
