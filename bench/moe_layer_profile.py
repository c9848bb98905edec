"""Where the torch target's time goes at a few tokens, and why a small op costs so much there.

- `torch_split(module, x, calls)`: torch.profiler over ``calls`` calls of a loaded ``torch``
  program, in place (the weights streaming through the caches between the small ops, as in the
  timed runs): per call, ``profiled_ms`` (the profiled run's wall time), ``gemm_ms`` (its
  GEMMs: oneDNN's ``mkldnn::_linear_pointwise`` of the ``kernel`` lowering, ``aten::_grouped_mm``
  of ``grouped_mm``, at any depth), ``other_ms`` (the rest: the other ops and the Python between
  them) and ``other_ops`` (how many other top-level ops ran; an op-kernel ``moec::moe`` node
  counts as one). Both parts come from the same run; the profiler adds a microsecond or two to
  every op.
- `small_op_us(src, dst)`: one small op timed on warm caches and right after a large copy.
- `idle_matmul_us(h, i, experts, threads)`: what ONNX Runtime spends on a MatMul with no rows,
  which is what the gather lowering's two nodes per expert cost on every expert the tokens did
  not choose (58 of 64 at one token on config B).

ONNX Runtime's profiler cannot split its rows the same way: with it on, the MatMul nodes alone
took longer than a whole unprofiled run of the graph (it records memory statistics per node).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moec.benchmark import median_ms

GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::_grouped_mm")  # kernel's, grouped_mm's
WARMUP = 5


def torch_split(module, x: torch.Tensor, calls: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(WARMUP):
            module(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                module(x)
            wall_us = (time.perf_counter() - start) * 1e6
    gemm_us = sum(e.cpu_time_total for e in prof.events() if e.name in GEMM_OPS)
    top = [e for e in prof.events() if e.cpu_parent is None and e.name not in GEMM_OPS]
    return dict(
        profiled_ms=wall_us / calls / 1e3,
        gemm_ms=gemm_us / calls / 1e3,
        other_ms=(wall_us - gemm_us) / calls / 1e3,
        other_ops=round(len(top) / calls),
    )


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
