"""``hf:DIR`` without its weights in memory: the model built on the meta device, each weight a
recipe over the checkpoint (`moec.models.lazy_weights`).

transformers' own loader maps the checkpoint's keys onto the model (renames, and the
conversions of transformers 5: per-expert tensors stacked into fused 3-D experts); it runs on
meta tensors under `recording()`, so that what it does is recorded instead of done.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moec.errors import NotStreamableError, SourceError
from moec.models.checkpoint import Checkpoint
from moec.models.hf_models import hf_config, warn_if_upcast
from moec.models.lazy_weights import checkpoint_meta, recipe_of, recording

__all__ = ["load_hf_dir_lazily"]


def load_hf_dir_lazily(directory: str, trust_remote_code: bool = False) -> nn.Module:
    """The model in ``directory`` with every weight on the meta device and recorded (buffers
    the model computes itself, such as rotary frequencies, are real), float32, eval mode."""
    try:  # transformers 5's loader; moec records what it does
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError as e:
        raise NotStreamableError(f"this transformers has no loader moec can record ({e})") from e

    config, auto, config_json = hf_config(directory, trust_remote_code)
    checkpoint = Checkpoint(Path(directory))
    with _parameters_on_meta():
        model = auto._from_config(config)  # what transformers' Auto classes call
    dtype = torch.float32
    load_config = LoadStateDictConfig(
        device_map={"": "meta"},
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=get_model_conversion_mapping(model),
    )
    state = {key: _StoredSlice(checkpoint, key) for key in checkpoint.tensors}
    # transformers loads in a thread pool unless told not to; recording sees one thread
    with recording(), mock.patch.dict(os.environ, {"HF_DEACTIVATE_ASYNC_LOAD": "1"}):
        info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
        model.tie_weights()
    errors = [_mismatch(*m) for m in sorted(info.mismatched_keys)]
    errors += [f"{k}: {v}" for k, v in info.conversion_errors.items()]
    if errors:
        raise SourceError(
            f"hf:{directory}: cannot load its weights into a {config_json.get('model_type')} "
            f"model built from config.json ({'; '.join(errors[:2])}); the safetensors must "
            "match the config"
        )
    missing = [n for n, p in model.named_parameters() if recipe_of(p) is None]
    missing += [n for n, b in model.named_buffers() if b.is_meta and recipe_of(b) is None]
    if missing:
        raise NotStreamableError(
            f"the checkpoint has no tensor for {len(missing)} weight(s) of the model "
            f"({', '.join(missing[:3])})"
        )
    warn_if_upcast(directory, config_json)
    model.moec_checkpoint = checkpoint  # its recipes live as long as the model
    return model.eval()


def _mismatch(name: str, stored, expected) -> str:
    return f"{name} is {list(stored)} in the checkpoint, {list(expected)} in the model"


class _StoredSlice:
    """What transformers' loader takes for a checkpoint tensor: indexing it (``t[...]``)
    gives a recorded meta tensor instead of reading the data."""

    def __init__(self, checkpoint: Checkpoint, key: str):
        self.checkpoint, self.key = checkpoint, key

    def __getitem__(self, index) -> torch.Tensor:
        return checkpoint_meta(self.checkpoint, self.key)[index]

    def get_shape(self) -> list[int]:
        return list(self.checkpoint.tensors[self.key].shape)

    def get_dtype(self) -> str:
        return str(self.checkpoint.tensors[self.key].dtype)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built meanwhile put their parameters on the meta device (their buffers stay);
    large tensors are made there to begin with (`_LargeOnMeta`)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        with _LargeOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


LARGE = 1 << 22  # bytes from which an empty tensor made without a device is made on meta
FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.randn, torch.rand}


class _LargeOnMeta(TorchFunctionMode):
    """Large tensors made without a device go to the meta device: a weight is never allocated
    in memory, even for a moment (buffers a model computes are small and stay real; a large
    one that ends up without data is refused after loading)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            whole = func is torch.full or (len(args) == 1 and isinstance(args[0], (tuple, list)))
            size = args[0] if whole else args  # full(size, value), empty(size), empty(*size)
            itemsize = (kwargs.get("dtype") or torch.get_default_dtype()).itemsize
            if all(isinstance(d, int) for d in size) and math.prod(size) * itemsize >= LARGE:
                kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)
