"""Blocks routed by their own code: a user's MoE block whose forward takes more than the hidden
states (a gate that also reads a context tensor, as in JetMoE-style context-aware gating; a task
id; a mask), with a ModuleList of FFN experts, written with a Python loop over the experts or
with masks.

The gate is kept as the block's own exported ops, read without knowing them: the block runs
with each expert replaced by an emitter that returns one fixed row for every token it is given,
first zeros (giving ``rest``: what the block adds besides its experts, such as a shared expert
or a residual), then its expert's unit vector. The block's output being ``rest + sum over e of
w[t, e] * expert_e(x[t])``, the second run minus the first is ``w`` [T, E]: the block's gate,
top-k, normalisation, mask and combine, all its own. Its ``top_k`` largest-in-use entries are
handed to the ``moec::moe`` op (``routing="external"``), which runs the experts.

The block is read from its call on the model's example inputs (`recorded_call`): ``top_k`` is
the most experts a token used there, and the reading must reproduce the block's output on it.
A block it does not reproduce is refused with the reason and stays the model's own ops.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from moec.errors import UnsupportedBlockError
from moec.ir import MoESpec, moe_eager
from moec.models.block_calls import recorded_call
from moec.models.conversion import Conversion
from moec.models.generic_moe import as_ffn, expert_list, takes_more_than_hidden_states

__all__ = ["GateReader", "OwnGateAdapter"]

CHECK_RTOL = 1e-5


@dataclass
class _Pass:
    """Which unit vectors the emitters give: None for zeros, c for experts c*H .. (c+1)*H-1."""

    active: int | None = None


class _Emitter(nn.Module):
    def __init__(self, index: int, hidden: int, state: _Pass):
        super().__init__()
        self.index, self.hidden, self.state = index, hidden, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row = x.new_zeros(self.hidden)
        if self.state.active == self.index // self.hidden:
            row[self.index % self.hidden] = 1
        return row.expand(*x.shape[:-1], self.hidden)


class GateReader(nn.Module):
    """``(hidden [T, H], ids [T, k], weights [T, k], rest [..., H])`` of a call of ``block``,
    computed by the block's own code with emitters in place of its experts."""

    def __init__(self, block: nn.Module, experts_name: str, hidden: int, top_k: int):
        super().__init__()
        num_experts = len(getattr(block, experts_name))
        self.state = _Pass()
        self.block = copy.copy(block)  # the user's block keeps its experts, and its hooks
        self.block._modules = dict(block._modules)
        for name, value in vars(block).items():
            if "_hooks" in name and isinstance(value, dict):
                setattr(self.block, name, type(value)())
        self.block._modules[experts_name] = nn.ModuleList(
            _Emitter(e, hidden, self.state) for e in range(num_experts)
        )
        self.num_experts, self.hidden, self.top_k = num_experts, hidden, top_k
        self.first = _first_parameter(block)
        # distinct keys: experts in use first, then by index, so no two backends break ties apart
        self.register_buffer("rank", torch.arange(num_experts - 1, -1, -1.0), persistent=False)

    def dense_weights(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(w [T, E], rest [..., H]) of this call."""
        self.state.active = None
        rest = self.block(*args, **kwargs)
        columns = []
        for c in range(math.ceil(self.num_experts / self.hidden)):
            self.state.active = c
            width = min(self.hidden, self.num_experts - c * self.hidden)
            columns.append((self.block(*args, **kwargs) - rest)[..., :width])
        self.state.active = None
        return torch.cat(columns, -1).reshape(-1, self.num_experts), rest

    def forward(self, *args, **kwargs):
        w, rest = self.dense_weights(*args, **kwargs)
        order = (w != 0).float() * self.num_experts + self.rank
        ids = order.topk(self.top_k, dim=-1).indices
        x = args[0] if args else kwargs[self.first]  # the hidden states the experts read
        return x.reshape(-1, self.hidden), ids, w.gather(-1, ids), rest


def _first_parameter(block: nn.Module) -> str:
    """The name of the block's first forward parameter: the hidden states its experts read."""
    return next(iter(inspect.signature(block.forward).parameters))


class OwnGateAdapter:
    name = "own-gate"

    def convert(self, module: nn.Module) -> Conversion | None:
        experts = expert_list(module)
        if experts is None or not takes_more_than_hidden_states(module):
            return None
        call = recorded_call(module)
        if call is None:
            raise UnsupportedBlockError(
                "its forward takes more than the hidden states; moec reads such a block from "
                "its call on the model's example inputs, and the model did not call it there"
            )
        args, kwargs, ref = call
        first = _first_parameter(module)
        x = args[0] if args else kwargs.get(first)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise UnsupportedBlockError(
                f"its first input ({first}) is not a float tensor of hidden states: moec reads "
                "blocks whose experts run on their first input"
            )
        if not isinstance(ref, torch.Tensor) or ref.shape != x.shape:
            raise UnsupportedBlockError(
                f"it returns {type(ref).__name__}, not one tensor shaped like its first input "
                f"{tuple(x.shape)}: moec reads blocks whose output is the MoE output"
            )
        hidden = x.shape[-1]
        ffn = as_ffn(experts, hidden)
        if ffn is None:
            raise UnsupportedBlockError(
                "its experts are not FFNs moec can stack (two or three Linears with one of "
                "moec's activations); register an adapter for it (docs/adapters.md)"
            )
        fields, weights = ffn
        experts_name = next(n for n, c in module.named_children() if c is experts)
        reader = GateReader(module, experts_name, hidden, top_k=1)
        with torch.no_grad():
            w, _ = reader.dense_weights(*args, **kwargs)
            reader.top_k = max(1, int((w != 0).sum(-1).max()))
            spec = MoESpec(
                num_experts=len(experts),
                top_k=reader.top_k,
                hidden_size=hidden,
                expert_size=weights.w_up.shape[1],
                routing="external",
                signed_weights=True,
                **fields,
            )
            tokens, ids, gates, rest = reader(*args, **kwargs)
            out = moe_eager(spec, weights, tokens, ids, gates)[0].reshape(ref.shape) + rest
        if not torch.allclose(out, ref, rtol=CHECK_RTOL, atol=CHECK_RTOL * ref.abs().max()):
            raise UnsupportedBlockError(
                "its output is not its input's experts weighted by its own gate (read with "
                "each expert replaced by a fixed row, the block does not reproduce its output: "
                "its experts may read another tensor than its first input); register an "
                "adapter for it (docs/adapters.md)"
            )
        return Conversion(spec, weights, gate=reader)
