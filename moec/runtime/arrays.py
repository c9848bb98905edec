"""numpy <-> torch for every dtype an artifact takes. numpy has no bfloat16: bfloat16 arrays
are ``ml_dtypes.bfloat16`` (the type ONNX uses), viewed bit for bit as torch's bfloat16."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["is_torch", "numpy_dtype", "to_numpy", "to_torch"]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest dtype name (``bfloat16`` included)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def is_torch(value: Any) -> bool:
    """Whether ``value`` is a torch object (without importing torch)."""
    return type(value).__module__.startswith("torch")


def to_numpy(tensor: Any) -> np.ndarray:
    """A CPU torch tensor's values as a numpy array (no copy)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_torch(array: np.ndarray) -> Any:
    """A numpy array as a torch tensor sharing its memory."""
    import torch

    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
