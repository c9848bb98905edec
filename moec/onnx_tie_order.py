"""Eager top-k that breaks ties as ONNX's ``TopK`` does: the lower index first.

PyTorch leaves the order of equal elements in ``topk`` to its kernel (on CPU, a heap's order);
ONNX's ``TopK`` specifies the lower index first, and ONNX Runtime keeps it. Where a model's own
code takes a top-k of exactly equal scores (an attention mask over keys that score the same, an
indexer whose ReLU'd scores are all zero), both choices are valid and its outputs differ by
which one ran. An ONNX artifact is therefore checked against the eager model with ONNX's order.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["OnnxTopkTies", "stable_topk"]


def stable_topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """``torch.topk`` with equal elements in index order (``sorted`` is moot: always sorted)."""
    values, order = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), order.narrow(dim, 0, k)))


class OnnxTopkTies(TorchFunctionMode):
    """While active, every ``torch.topk`` / ``Tensor.topk`` call is `stable_topk`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.topk, torch.Tensor.topk) and "out" not in kwargs:
            return stable_topk(*args, **kwargs)
        return func(*args, **kwargs)
