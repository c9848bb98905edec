"""Where the torch target's time goes at a few tokens, and why a small op costs so much there.

- `torch_split(module, x, repeat)`: a loaded ``torch`` program split into its GEMMs and the rest,
  each timed on its own. One call is recorded: every GEMM it makes on a packed weight (experts,
  shared expert, linear layers: its `PackedGemm` calls), with inputs and output. Then ``gemm_ms``
  is those GEMMs alone, run again back to back on the same inputs and packed weights, and
  ``other_ms`` the program with each GEMM replaced by its recorded output (the same routing, bit
  for bit, and no other GEMM but those too small to pack: both are checked, see `_CountOps`), which
  leaves its other ops and the Python between them, timed on warm caches (where a small op is
  cheapest); ``other_ops`` counts its aten ops. The whole program (``ms``), the GEMMs and the rest
  are timed in turn, round after round, so that all three see the host alike; ``gemm_ms +
  other_ms`` is a lower bound on what this program can take per call, and ``ms`` minus it what
  running in place adds (the small ops on caches the weights have streamed through).
  The profiler is no use for this split: it inflates each small op by a microsecond or two,
  and index_add (the combine) by 200 us.
- `small_op_us(src, dst)`: one small op timed on warm caches and right after a large copy.
- `idle_matmul_us(h, i, experts, threads)`: what ONNX Runtime spends on a MatMul with no rows,
  which is what the gather lowering's two nodes per expert cost on every expert the tokens did
  not choose (58 of 64 at one token on config B).

ONNX Runtime's profiler cannot split its rows the same way: with it on, the MatMul nodes alone
took longer than a whole unprofiled run of the graph (it records memory statistics per node).
"""

from __future__ import annotations

import collections
import statistics
import time
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moec.runtime.packed_gemm import PackedGemm
from moec.runtime.weight_packing import MIN_PACKED_OUT_FEATURES
from moec.timing import median_ms

WARMUP = 5
GEMMS = ("mm", "addmm", "bmm", "matmul", "linear", "_grouped_mm", "_linear_pointwise")


class _CountOps(TorchDispatchMode):
    """The aten ops a call runs, and the GEMMs among them with at least MIN_PACKED_OUT_FEATURES
    output columns and as many inner ones (those `pack_weights` packs). Smaller ones count among
    the other ops: a router over a few experts, which stays a dense GEMM, and the one-token
    combine of k expert outputs by their gates, [1, k] x [k, H]."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.large_gemms: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names.append(name)
        out = func(*args, **(kwargs or {}))
        if name in GEMMS:
            inner = (args[1] if name == "addmm" else args[0]).shape[-1]  # addmm: bias first
            if min(out.shape[-1], inner) >= MIN_PACKED_OUT_FEATURES:
                self.large_gemms.append(name)
        return out


def torch_split(module, x: torch.Tensor, repeat: int) -> dict | None:
    """``module`` (a loaded, packed ``torch`` program) on ``x``: ms per call of the whole program,
    its GEMMs alone and the rest alone (module docstring), medians of ``repeat`` rounds; None if
    it runs no packed GEMM."""
    real, calls = PackedGemm.__call__, []
    outputs = None  # while replaying: each weight's recorded outputs, in its call order

    def record(weight, a, bias=None):
        out = real(weight, a, bias)
        calls.append((weight, a, bias, out))
        return out

    def gemm(weight, a, bias=None):  # the real GEMM, or while replaying its recorded output
        if outputs is None:
            return real(weight, a, bias)
        out = outputs[weight].popleft()  # per weight: experts side by side finish in any order
        if out.shape[:-1] != a.shape[:-1]:
            raise AssertionError("the replayed program made other GEMMs than the recorded one")
        return out

    def whole():
        nonlocal outputs
        outputs = None
        return module(x)

    def rest():
        nonlocal outputs
        outputs = collections.defaultdict(collections.deque)
        for weight, _, _, out in calls:
            outputs[weight].append(out)
        return module(x)

    def gemms():
        for weight, a, bias, _ in calls:
            real(weight, a, bias)

    with torch.no_grad():
        with mock.patch.object(PackedGemm, "__call__", record):
            expected = module(x)
        if not calls:
            return None
        patched = mock.patch.object(PackedGemm, "__call__", gemm)
        with patched, _CountOps() as ops:
            replayed = rest()
        pairs = zip(_flat(replayed), _flat(expected), strict=True)
        if not all(torch.equal(a, b) for a, b in pairs):
            raise AssertionError("the program with its GEMMs replayed computed another result")
        if left := sorted(set(ops.large_gemms)):
            raise AssertionError(f"GEMMs left in the program with its GEMMs replayed: {left}")
        times = {"ms": [], "gemm_ms": [], "other_ms": []}
        with patched:
            for round_ in range(WARMUP + repeat):
                for key, fn in zip(times, (whole, gemms, rest), strict=True):
                    if fn is rest:
                        rest()  # warms the caches the GEMMs streamed through
                    start = time.perf_counter()
                    fn()
                    if round_ >= WARMUP:
                        times[key].append((time.perf_counter() - start) * 1e3)
    split = {key: statistics.median(ms) for key, ms in times.items()}
    return dict(split, gemm_calls=len(calls), other_ops=len(ops.names))


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def small_op_us(src: torch.Tensor, dst: torch.Tensor, mib: int = 64) -> dict:
    """The median time of one small op (a sigmoid over [1, 64], a router's size) on warm caches
    and right after copying ``mib`` MiB of ``src`` into ``dst`` (about a layer's weights at one
    token) has pushed everything else out of them."""
    x, n = torch.randn(1, 64), (mib << 20) // src.element_size()

    def once(flush) -> float:
        if flush:
            dst[:n].copy_(src[:n])
        start = time.perf_counter()
        x.sigmoid()
        return (time.perf_counter() - start) * 1e6

    for _ in range(WARMUP):
        x.sigmoid()
    calls = 51
    warm = sorted(once(False) for _ in range(calls))[calls // 2]
    cold = sorted(once(True) for _ in range(calls))[calls // 2]
    return {"warm": warm, f"after streaming {mib} MiB": cold}


def idle_matmul_us(h: int, i: int, experts: int, threads: int) -> float:
    """Median microseconds per node of a graph of ``experts`` pairs of MatMuls on zero rows,
    [0, h] x [h, 2i] and [0, i] x [i, h] (an idle expert of the gather lowering)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inputs = {"x": (h, 2 * i), "hidden": (i, h)}
    nodes, weights, outputs = [], [], []
    for e in range(experts):
        for name, shape in inputs.items():
            w, y = f"{name}_w{e}", f"{name}_y{e}"
            weights.append(numpy_helper.from_array(rng.standard_normal(shape, np.float32), w))
            nodes.append(helper.make_node("MatMul", [name, w], [y]))
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "idle_experts",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [0, s[0]]) for n, s in inputs.items()],
        outputs,
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options)
    feeds = {n: np.zeros((0, s[0]), np.float32) for n, s in inputs.items()}
    ms = median_ms(lambda: session.run(None, feeds), repeat=21, warmup=WARMUP)
    return ms * 1e3 / len(nodes)
