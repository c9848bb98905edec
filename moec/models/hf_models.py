"""Hugging Face models as moec sources: ``hf:DIR`` and in-memory ``PreTrainedModel``s.

``hf:DIR`` is a directory written by ``save_pretrained`` (config.json + safetensors). The model is
built from its config by transformers' Auto classes and its weights loaded from the directory;
nothing is downloaded and no remote code runs.

Whole-model capture wraps the model so that its signature is plain tensors:

- causal LMs: ``(input_ids [B, S], attention_mask [B, S]) -> logits [B, S, V]``;
- models without a head (``…Model``, ``…TextModel``): the same inputs ``-> last_hidden_state
  [B, S, H]``, known by the output class their forward is annotated to return; they do not
  generate, so they get no KV cache;
- encoder-decoders (SwitchTransformers, NLLB-MoE): ``(input_ids, attention_mask,
  decoder_input_ids [B, T]) -> logits [B, T, V]``.

The KV cache is not an input or output (``use_cache=False``). Verification draws token ids in
``[0, vocab_size)`` and an all-ones attention mask.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from moec.errors import SourceError
from moec.models.model_source import ModelSource

__all__ = [
    "BaseModelHidden",
    "CausalLMLogits",
    "Seq2SeqLMLogits",
    "hf_model_source",
    "hf_tokenizer",
    "is_hf_model",
    "load_hf_dir",
]

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# The traced sequence length is prime: code that splits the sequence into blocks or chunks of
# a power-of-two size then traces its padding path (right for every length) and, up to size 8,
# more than one block, where a length equal to the size traces a graph for that length alone.
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 11


class _TokenModel(nn.Module):
    """``(input_ids, attention_mask) -> out.<output>`` of a transformers model, without cache."""

    output = ""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters.values()
        # a forward that takes **kwargs passes them on to the base model, whose use_cache
        # otherwise defaults to the config's (a cache built and filled during the call)
        self.takes_cache = any(p.name == "use_cache" or p.kind == p.VAR_KEYWORD for p in params)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.takes_cache else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if getattr(out, self.output, None) is None:
            raise SourceError(
                f"{type(self.model).__name__} returns no {self.output}; moec compiles models "
                "with a head (…ForCausalLM, …ForConditionalGeneration, …ForTokenClassification) "
                "or base models that return last_hidden_state"
            )
        return getattr(out, self.output)


class CausalLMLogits(_TokenModel):
    """Causal LMs, and any other head that returns ``logits`` from token ids (classifiers)."""

    output = "logits"


class BaseModelHidden(_TokenModel):
    """Models without a head: token ids -> ``last_hidden_state`` [B, S, H]."""

    output = "last_hidden_state"


def _is_headless(model: nn.Module) -> bool:
    """Whether ``model.forward`` is annotated to return outputs with ``last_hidden_state`` and
    no ``logits`` (transformers' base models); a model without annotations counts as headed."""
    try:
        returned = typing.get_type_hints(type(model).forward).get("return")
    except (NameError, TypeError, AttributeError):
        return False
    classes = typing.get_args(returned) or (returned,)
    fields = [set(getattr(c, "__dataclass_fields__", ())) for c in classes]
    return any("last_hidden_state" in f for f in fields) and not any("logits" in f for f in fields)


class Seq2SeqLMLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        )
        return out.logits


def _examples(model_name: str, given: tuple | None, seq2seq: bool) -> tuple:
    """The user's example inputs for a transformers model, checked: int tensors [batch, seq]
    of one shape (input_ids, attention_mask), then decoder_input_ids for an encoder-decoder."""
    if given is None:
        return ()
    names = ["input_ids", "attention_mask"] + (["decoder_input_ids"] if seq2seq else [])
    form = f"({', '.join(names)})"
    if not 1 <= len(given) <= len(names):
        raise SourceError(
            f"{model_name} takes example inputs {form} (the mask and later ones optional); "
            f"got {len(given)}"
        )
    for name, value in zip(names, given, strict=False):
        if (
            not isinstance(value, torch.Tensor)
            or value.ndim != 2
            or value.dtype.is_floating_point
            or value.dtype == torch.bool
        ):
            what = (
                f"{value.dtype} {list(value.shape)}"
                if isinstance(value, torch.Tensor)
                else (type(value).__name__)
            )
            raise SourceError(
                f"example {name} of {model_name} must be an integer tensor [batch, seq]; got "
                f"{what}: pass {form}"
            )
    if len(given) > 1 and given[1].shape != given[0].shape:
        raise SourceError(
            f"example attention_mask {list(given[1].shape)} differs from input_ids "
            f"{list(given[0].shape)}; they must have one shape"
        )
    return tuple(v.to(torch.int64) for v in given)


def is_hf_model(model: object) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


REMOTE_CODE_HINT = (
    "moec does not run a model directory's own Python code unless you pass --trust-remote-code "
    "(trust_remote_code=True)"
)


def load_hf_dir(
    directory: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Build the model saved in ``directory`` (config.json + safetensors) in eval mode: in
    ``dtype`` when the checkpoint is stored in it (a bf16 checkpoint compiled to bf16 is never
    upcast), else in float32. Python code the directory ships (``auto_map``) runs only with
    ``trust_remote_code``."""
    _, auto, config_json = hf_config(directory, trust_remote_code)
    stored = config_json.get("dtype") or config_json.get("torch_dtype")
    dtype = dtype if str(dtype).removeprefix("torch.") == stored else torch.float32
    try:
        model = auto.from_pretrained(
            Path(directory),
            local_files_only=True,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(
            f"hf:{directory}: cannot load its weights into a {config_json.get('model_type')} "
            f"model built from config.json ({first}); the safetensors must match the config"
        ) from e
    if dtype == torch.float32:
        warn_if_upcast(directory, config_json)
    return model.eval()


def hf_config(directory: str, trust_remote_code: bool = False) -> tuple[Any, Any, dict]:
    """(config, the Auto class that builds it, config.json) of a ``save_pretrained``
    directory; refused with the reason when transformers cannot build it."""
    path = Path(directory)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(
            f"hf:{directory} has no config.json; give a directory written by save_pretrained"
        )
    try:
        config_json = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(f"hf:{directory}: config.json is not valid JSON ({e})") from e
    if not isinstance(config_json, dict):
        raise SourceError(f"hf:{directory}: config.json is not a JSON object")
    model_type = config_json.get("model_type")
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError as e:
        raise SourceError(
            f"hf:{directory} needs transformers, which is not installed; pip install 'moec[hf]'"
        ) from e

    transformers.utils.logging.disable_progress_bar()

    remote = "auto_map" in config_json
    try:
        config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError) as e:
        if remote and not trust_remote_code:
            raise SourceError(
                f"hf:{directory}: its model_type {model_type!r} is defined by the Python code it "
                f"ships (auto_map in config.json); {REMOTE_CODE_HINT}"
            ) from e
        raise SourceError(
            f"hf:{directory}: transformers {transformers.__version__} does not know "
            f"model_type {model_type!r} ({str(e).splitlines()[0]})"
        ) from e
    auto = _auto_class(config)
    if auto is None:
        raise SourceError(
            f"hf:{directory}: {type(config).__name__} ({model_type}) is a sub-model configuration "
            "that transformers' Auto classes cannot build on its own; save the whole model "
            "(...ForCausalLM or ...ForConditionalGeneration)"
        )
    return config, auto, config_json


def warn_if_upcast(directory: str, config_json: dict) -> None:
    """Say that a half-precision checkpoint is built in float32 unless --dtype says otherwise."""
    stored = config_json.get("dtype") or config_json.get("torch_dtype")
    if stored in ("bfloat16", "float16"):
        log.warning(
            "hf:%s stores its weights in %s; moec builds the model in float32 (the same "
            "values, exactly); --dtype %s compiles it in %s",
            directory,
            stored,
            {"bfloat16": "bf16", "float16": "fp16"}[stored],
            stored,
        )


def hf_tokenizer(
    directory: Path, trust_remote_code: bool = False
) -> Callable[[str], list[int]] | None:
    """The tokenizer saved beside the model (text -> ids, no special tokens), if there is one."""
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise SourceError(
            f"hf:{directory}: its tokenizer is its own Python code; {REMOTE_CODE_HINT}"
        ) from e
    return functools.partial(tokenizer.encode, add_special_tokens=False)


def _auto_class(config):
    """The class config.json names (``architectures``), else the Auto class that maps it."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and cls.config_class is type(config):
            return cls
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSeq2SeqLM,
    )

    for auto in (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForImageTextToText,
        AutoModel,
    ):
        if type(config) in auto._model_mapping:
            return auto
    return None


def hf_model_source(model: nn.Module, example_inputs: tuple | None = None) -> ModelSource:
    """A capturable source for a transformers model (see module docstring); ``example_inputs``
    (the user's ``(input_ids[, attention_mask[, decoder_input_ids]])``) are checked, and
    traced where each dim is at least 2 (export keeps a dim of 1 static)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(text_config.vocab_size)
    max_seq = getattr(text_config, "max_position_embeddings", None)
    seq = (
        Dim("sequence_length", max=max_seq)
        if isinstance(max_seq, int) and max_seq > 1
        else Dim("sequence_length")
    )
    batch = Dim("batch")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=g)
    mask = torch.ones_like(ids)
    seq2seq = getattr(config, "is_encoder_decoder", False)
    decoder_ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ - 2), generator=g)
    given = _examples(type(model).__name__, example_inputs, seq2seq)
    if given and min(given[0].shape) >= 2:
        ids = given[0]
        mask = given[1] if len(given) > 1 else torch.ones_like(ids)
        if len(given) > 2 and min(given[2].shape) >= 2:
            decoder_ids = given[2]
    if seq2seq:
        decoder_seq = Dim("decoder_sequence_length")
        return ModelSource(
            model=Seq2SeqLMLogits(model).eval(),
            example_inputs=(ids, mask, decoder_ids),
            input_names=["input_ids", "attention_mask", "decoder_input_ids"],
            dynamic_shapes=(
                {0: batch, 1: seq},
                {0: batch, 1: seq},
                {0: batch, 1: decoder_seq},
            ),
            output_names=["logits"],
            input_ranges={
                "input_ids": (0, vocab),
                "attention_mask": (0, 2),
                "decoder_input_ids": (0, vocab),
            },
            roles={"attention_mask": "mask"},
        )
    wrapper = BaseModelHidden if _is_headless(model) else CausalLMLogits
    return ModelSource(
        model=wrapper(model).eval(),
        example_inputs=(ids, mask),
        input_names=["input_ids", "attention_mask"],
        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
        output_names=[wrapper.output],
        input_ranges={"input_ids": (0, vocab), "attention_mask": (0, 2)},
        roles={"attention_mask": "mask"},
    )
