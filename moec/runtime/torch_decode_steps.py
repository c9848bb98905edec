"""Decode steps of a ``torch`` artifact with the cache appended in place, in buffers allocated once.

A cache program grows each layer's cache by ``cat(past, new)``. For `generate`, a copy of the
program's graph sharing its weights calls `append_in_place` there instead: the past is a view
of a buffer sized for the whole generation, and the new tokens are written after it in that
buffer, so a step neither allocates nor copies the cache. The runner's own program (what
``infer`` runs) is left as it is: a caller's past is never written into.
"""

from __future__ import annotations

import numpy as np
import torch

from moec.runtime.arrays import to_numpy, to_torch

__all__ = ["TorchDecodeSteps", "append_in_place"]


def append_in_place(past: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    """``cat([past, new], dim)`` written into the storage after ``past``, a view of a larger
    buffer (as_strided refuses a view that would leave its storage)."""
    dim %= past.dim()
    size = list(past.shape)
    size[dim] += new.shape[dim]
    grown = past.as_strided(size, past.stride(), past.storage_offset())
    grown.narrow(dim, past.shape[dim], new.shape[dim]).copy_(new)
    return grown


class TorchDecodeSteps:
    """``steps(feeds) -> outputs`` for `generate` on a `TorchRunner`: feeds as
    `Decoding.next_step` builds them (the first with an empty past), at most ``total`` tokens;
    the logits come back as numpy, the presents as views of the buffers."""

    def __init__(self, runner, batch: int, total: int):
        self.runner = runner
        self.module, appends = _appending_copy(runner.module, runner.input_names)
        specs = {t.name: t for t in runner.manifest.inputs}
        self.buffers: dict[str, torch.Tensor] = {}
        for layer in runner.decoding.layers:
            for name, dim in ((layer.past_key, layer.key_dim), (layer.past_value, layer.value_dim)):
                dtype = to_torch(np.zeros(0, specs[name].dtype)).dtype
                shape = (batch, layer.kv_heads, total, dim)
                self.buffers[name] = torch.empty(shape, dtype=dtype, device=runner.device)
        self.in_place = sorted(appends) == sorted(self.buffers)  # else cat: buffers unused
        self.first = True

    def __call__(self, feeds: dict) -> dict:
        runner = self.runner
        if self.first:  # the caller's prompt and mask; later feeds are built by generate
            feeds = runner.checked_feeds(feeds)
            feeds = {
                name: self.buffers[name][:, :, :0] if name in self.buffers else value
                for name, value in feeds.items()
            }
            self.first = False
        args = [_tensor(feeds[name]).to(runner.device) for name in runner.input_names]
        module = self.module if self.in_place else runner.module
        with torch.no_grad():
            values = module.forward(*args)
        outputs = dict(zip(runner.output_names, values, strict=True))
        presents = set(runner.decoding.present_names)
        return {
            name: value if name in presents else to_numpy(value.cpu())
            for name, value in outputs.items()
        }


def _tensor(value):
    return value if isinstance(value, torch.Tensor) else to_torch(value)


def _appending_copy(module: torch.fx.GraphModule, input_names: list[str]):
    """A GraphModule sharing ``module``'s weights whose ``cat`` of a past input with the new
    tokens calls `append_in_place`; and the names of the inputs so appended to."""
    graph = torch.fx.Graph()
    remap = graph.graph_copy(module.graph, {})
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = dict(zip(placeholders, input_names, strict=False))
    appended = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
            continue
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        if len(tensors) == 2 and tensors[0] in names:
            node.target, node.args, node.kwargs = append_in_place, (*tensors, dim), {}
            appended.append(names[tensors[0]])
    graph.output(remap)
    graph.set_codegen(module.graph._codegen)
    copy = torch.fx.GraphModule(module, graph)
    return copy, appended
