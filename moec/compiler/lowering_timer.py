"""Time a block's candidate lowerings, on ONNX Runtime or in PyTorch, for picking the fastest.

The timing model is a single block with random weights of the block's shapes (speed does not
depend on the values) and, for external routing, a softmax top-k router in front; it is captured
and lowered once per candidate, then run at a few token counts.

The candidates are timed in round-robin rounds (each candidate at each size once per round, the
median of a few runs; each figure is the median of its rounds), so that a burst of load on a
shared host falls on every candidate alike: timed one after the other, a burst could flip the
choice between two lowerings that differ by 20%.
"""

from __future__ import annotations

import functools
import math
import statistics
import tempfile
import time
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn
from torch.export import Dim

from moec.compiler.capture import capture, moe_nodes
from moec.compiler.lower_onnx import lower_to_onnx
from moec.compiler.moe_block import MoEBlock, MoEExpertsBlock
from moec.ir import WEIGHT_NAMES, MoESpec, MoEWeights
from moec.models import ModelSource

__all__ = ["TIMED_TOKENS", "time_lowerings"]

TIMED_TOKENS = (1, 16, 256)
ROUNDS = 3
REPEAT = 5
SETTLE_S = 0.05  # ORT's worker threads spin after a run; let them stop before another session


class _RoutedExperts(nn.Module):
    """A softmax top-k router feeding an experts-only block, for timing external routing."""

    def __init__(self, spec: MoESpec, weights: MoEWeights):
        super().__init__()
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = MoEExpertsBlock(spec, weights)
        self.top_k = spec.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        return self.experts(x, ids, weights)


def _timing_model(spec: MoESpec, present: set[str]) -> ModelSource:
    g = torch.Generator().manual_seed(0)
    shapes = MoEWeights.expected_shapes(spec)
    tensors = {
        name: torch.randn(*shapes[name], generator=g) * 0.02
        for name in WEIGHT_NAMES
        if name in present and shapes[name] is not None
    }
    weights = MoEWeights(**{name: tensors.get(name) for name in WEIGHT_NAMES})
    if spec.routing == "external":
        x = torch.randn(8, spec.hidden_size, generator=g)
        return ModelSource(_RoutedExperts(spec, weights), (x,), ["x"], ({0: Dim("tokens")},))
    x = torch.randn(1, 8, spec.hidden_size, generator=g)
    return ModelSource(MoEBlock(spec, weights), (x,), ["x"], ({1: Dim("tokens")},))


def time_lowerings(
    spec: MoESpec, present: set[str], lowerings: list[str], target: str, tokens=TIMED_TOKENS
) -> dict[str, float]:
    """Per lowering, its time relative to the fastest, as the geometric mean over ``tokens``
    (1.0: fastest at every size); each size weighs alike, whatever its absolute time. ``target``
    ``ort`` times the lowered ONNX graphs on ONNX Runtime, ``torch`` the loaded program as
    `TorchRunner` runs it (weights packed)."""
    captured = capture(_timing_model(spec, present))
    g = torch.Generator().manual_seed(1)
    inputs = []
    for t in tokens:
        shape = (t, spec.hidden_size) if spec.routing == "external" else (1, t, spec.hidden_size)
        inputs.append(torch.randn(*shape, generator=g))
    build = _torch_runs if target == "torch" else _ort_runs
    runs = build(captured, spec, lowerings, inputs)
    for calls in runs.values():
        for call in calls:  # warm-up: first runs allocate and prepack
            call()
    rounds: dict[str, list[list[float]]] = {lowering: [] for lowering in lowerings}
    for _ in range(ROUNDS):
        for lowering, calls in runs.items():
            time.sleep(SETTLE_S)
            rounds[lowering].append([_median_s(call) for call in calls])
    per_size = {
        lowering: [statistics.median(r[i] for r in timed) for i in range(len(tokens))]
        for lowering, timed in rounds.items()
    }
    best = [min(times[i] for times in per_size.values()) for i in range(len(tokens))]
    return {
        lowering: math.exp(
            sum(math.log(t / b) for t, b in zip(times, best, strict=True)) / len(best)
        )
        for lowering, times in per_size.items()
    }


def _with_lowering(captured, spec: MoESpec, lowering: str) -> None:
    (node,) = moe_nodes(captured.program)
    node.args = (*node.args[:-1], spec.with_lowering(lowering).to_json())


def _ort_runs(captured, spec: MoESpec, lowerings: list[str], inputs: list[torch.Tensor]):
    import onnxruntime as ort

    runs = {}
    with tempfile.TemporaryDirectory(prefix="moec-timing-") as tmp:
        for lowering in lowerings:
            _with_lowering(captured, spec, lowering)
            # a file with external data: a large layer's weights exceed protobuf's 2 GB
            path = Path(tmp) / f"{lowering}.onnx"
            ir.save(lower_to_onnx(captured, "ort"), path, external_data=f"{lowering}.onnx.data")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            runs[lowering] = [
                functools.partial(session.run, None, {"x": x.numpy()}) for x in inputs
            ]
    return runs


def _torch_runs(captured, spec: MoESpec, lowerings: list[str], inputs: list[torch.Tensor]):
    from moec.runtime.torch_runner import prepare_program

    runs = {}
    for lowering in lowerings:
        _with_lowering(captured, spec, lowering)
        module = captured.program.module()
        prepare_program(module)
        runs[lowering] = [functools.partial(_no_grad, module, x) for x in inputs]
    return runs


def _no_grad(module, x: torch.Tensor):
    with torch.no_grad():
        return module.forward(x)  # as TorchRunner calls it (prepare_program)


def _median_s(call) -> float:
    call()
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
