"""Where the torch target's time goes at a few tokens, and why a small op costs so much there.

- `torch_split(module, x, calls)`: torch.profiler over ``calls`` calls of a loaded ``torch``
  program, in place (the weights streaming through the caches between the small ops, as in the
  timed runs): per call, ``profiled_ms`` (the profiled run's wall time), ``gemm_ms`` (its
  top-level oneDNN GEMMs, ``mkldnn::_linear_pointwise``), ``other_ms`` (the rest: the other ops
  and the Python between them) and ``other_ops`` (how many other top-level ops ran). Both parts
  come from the same run; the profiler adds a microsecond or two to every op.
- `small_op_us(src, dst)`: one small op timed on warm caches and right after a large copy.

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
