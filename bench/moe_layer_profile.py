"""Where the torch target's time goes at a few tokens, and why a small op costs so much there.

- `torch_split(module, x, calls)`: torch.profiler over ``calls`` calls of a loaded ``torch``
  program, in place (the weights streaming through the caches between the small ops, as in the
  timed runs): per call, ``profiled_ms`` (the profiled run's wall time), ``gemm_ms`` (its
  top-level oneDNN GEMMs, ``mkldnn::_linear_pointwise``), ``other_ms`` (the rest: the other ops
  and the Python between them) and ``other_ops`` (how many other top-level ops ran). Both parts
  come from the same run; the profiler adds a microsecond or two to every op.
- `small_op_us(flush)`: one small op timed on warm caches and right after ``flush()``.

ONNX Runtime's profiler cannot split its rows the same way: with it on, the MatMul nodes alone
took longer than a whole unprofiled run of the graph (it records memory statistics per node).
"""

from __future__ import annotations

import time

import torch

GEMM_OP = "mkldnn::_linear_pointwise"
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
    top = [e for e in prof.events() if e.cpu_parent is None]
    gemms = [e for e in top if e.name == GEMM_OP]
    gemm_us = sum(e.cpu_time_total for e in gemms)
    return dict(
        profiled_ms=wall_us / calls / 1e3,
        gemm_ms=gemm_us / calls / 1e3,
        other_ms=(wall_us - gemm_us) / calls / 1e3,
        other_ops=round((len(top) - len(gemms)) / calls),
    )


def small_op_us(flush, calls: int = 50) -> dict:
    """The median time of one small op (a sigmoid over [1, 64], a router's size) on warm caches
    and right after ``flush()`` has streamed as many bytes as a layer's weights through them."""
    x = torch.randn(1, 64)

    def once(before) -> float:
        before()
        start = time.perf_counter()
        x.sigmoid()
        return (time.perf_counter() - start) * 1e6

    for _ in range(WARMUP):
        x.sigmoid()
    warm = sorted(once(lambda: None) for _ in range(calls))[calls // 2]
    cold = sorted(once(flush) for _ in range(calls))[calls // 2]
    return {"warm": warm, "after streaming 64 MiB": cold}
