"""One real call of each MoE-shaped block whose forward takes more than the hidden states.

Such a block (a gate that also reads a context tensor, a task id or a mask) cannot be probed on
random hidden states as the generic recogniser does: its other inputs have shapes only the
model knows. `recorded_block_calls` runs the model once on its example inputs and keeps each
such block's first call (arguments and output), for `OwnGateAdapter` to read the block from.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch
from torch import nn

from moec.models.generic_moe import expert_list, takes_more_than_hidden_states

__all__ = ["BlockCall", "recorded_block_calls", "recorded_call"]

BlockCall = tuple[tuple, dict, object]  # (args, kwargs, output)

_CALLS: WeakKeyDictionary[nn.Module, BlockCall] = WeakKeyDictionary()


def _needs_a_call(module: nn.Module) -> bool:
    return expert_list(module) is not None and takes_more_than_hidden_states(module)


@contextmanager
def recorded_block_calls(model: nn.Module, inputs: tuple) -> Iterator[None]:
    """While open, `recorded_call` gives the first call of each block of ``model`` that needs
    one, from one forward of ``model`` on ``inputs`` (run only when there is such a block)."""
    blocks = [m for m in model.modules() if _needs_a_call(m)]
    if not blocks:
        yield
        return

    def record(module, args, kwargs, output):
        _CALLS.setdefault(module, (args, kwargs, output))

    handles = [b.register_forward_hook(record, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception:  # nothing recorded; the block is refused, export reports the failure
        pass
    finally:
        for h in handles:
            h.remove()
    try:
        yield
    finally:
        for b in blocks:
            _CALLS.pop(b, None)


def recorded_call(module: nn.Module) -> BlockCall | None:
    return _CALLS.get(module)
