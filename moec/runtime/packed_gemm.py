"""`PackedGemm`: ``x @ weight.T`` with the weight held once, in oneDNN's blocked layout, and read
by whichever library is faster on this host for the call's number of rows.

oneDNN packs a float32 [out, in] weight for AVX-512 as ``AB16b64a`` (other ISAs may block
otherwise): blocks of ``b`` output rows, each an [in, b] row-major matrix. That is a dense
[out/b, in, b] tensor, so MKL reads the same bytes as one batched GEMM (``torch.bmm``), no copy.
The view is taken only when the packed buffer holds exactly that layout, checked element for
element against the dense weight when packing; otherwise every call takes oneDNN.

Why: a call into oneDNN's GEMM has a fixed cost outside its kernel (in torch's ideep
wrapper), and on some hosts its one-row GEMM streams slower than MKL's, while from a few rows
on its blocked GEMM is as fast or faster. Up to how many rows MKL wins is the host's (on some
CPUs oneDNN wins at every row count), so `mkl_rows_limit` measures it, once per weight shape
and thread count in a process. The measurements are in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import functools
import time

import torch

from moec.ir.expert_kernels import onednn_linear

__all__ = ["PackedGemm", "mkl_rows_limit"]

BLOCKS = (64, 32, 16, 8)  # output rows per block oneDNN's float32 layouts use
PROBE_ROWS = (1, 2, 4, 8, 16)  # row counts `mkl_rows_limit` tries, in order
PROBE_REPEAT = 7
PROBE_POOL_BYTES, PROBE_POOL_MAX = 32 << 20, 16


class PackedGemm:
    """One [out, in] float32 weight packed for oneDNN; ``gemm(x [..., in], bias) -> [..., out]``.

    Calls on at most ``mkl_rows`` rows run MKL on a view of the packed bytes (when the layout
    allows one); ``mkl_rows=None`` measures the limit on this host (`mkl_rows_limit`)."""

    def __init__(self, weight: torch.Tensor, mkl_rows: int | None = None):
        weight = weight.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.blocked = _blocked_view(self.packed, weight)  # [out/b, in, b] or None
        if self.blocked is None:
            self.mkl_rows = 0
        elif mkl_rows is None:
            self.mkl_rows = mkl_rows_limit(*weight.shape, torch.get_num_threads())
        else:
            self.mkl_rows = mkl_rows

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if 0 < x.numel() // self.in_features <= self.mkl_rows:  # 0 without a blocked view
            return self.mkl(x, bias)
        return self.onednn(x, bias)

    def onednn(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return onednn_linear(x, self.packed, bias)  # oneDNN takes any leading dims

    def mkl(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """MKL's batched GEMM on the blocked view (which must exist)."""
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        rows = len(flat)
        out = torch.bmm(flat.expand(len(self.blocked), rows, self.in_features), self.blocked)
        if rows > 1:  # [blocks, rows, b] -> [rows, blocks, b]; one row is in that order already
            out = out.transpose(0, 1)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias


def _blocked_view(packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The packed buffer as a dense [out/b, in, b] tensor, if it holds ``weight`` that way.

    The view shares the buffer of ``packed`` without owning it: keep ``packed`` alive as long
    as the view (`PackedGemm` holds both)."""
    out, inp = weight.shape
    if torch.ops.mkldnn._nbytes(packed) != weight.numel() * weight.element_size():
        return None  # padded: some dimension is not a multiple of the block
    buffer = (ctypes.c_float * weight.numel()).from_address(torch.ops.mkldnn.data_ptr(packed))
    flat = torch.frombuffer(buffer, dtype=torch.float32)
    for block in BLOCKS:
        if out % block == 0:
            view = flat.view(out // block, inp, block)
            if torch.equal(view, weight.view(out // block, block, inp).transpose(1, 2)):
                return view
    return None


@functools.cache
def mkl_rows_limit(out_features: int, in_features: int, threads: int) -> int:
    """The most rows (of `PROBE_ROWS`, 0 for none) up to which MKL on the blocked view beat
    oneDNN at every tried count, on this host and thread count, for [out, in] weights.

    Each timed call runs one GEMM on every weight of a pool of distinct random ones (at least
    `PROBE_POOL_BYTES`, or `PROBE_POOL_MAX` weights), one after another, as a block runs its
    chosen experts: one weight timed over and over would sit in the core's cache, where MKL
    wins more rows than it does on weights streaming from memory."""
    del threads  # part of the cache key: the timings hold for the count they ran with
    size = out_features * in_features * 4
    pool = [
        PackedGemm(torch.rand(out_features, in_features), mkl_rows=0)
        for _ in range(min(PROBE_POOL_MAX, max(2, -(-PROBE_POOL_BYTES // size))))
    ]
    if pool[0].blocked is None:
        return 0
    limit = 0
    with torch.no_grad():
        for rows in PROBE_ROWS:
            x = torch.rand(rows, in_features)
            mkl_s, onednn_s = _paired_medians(
                lambda: [gemm.mkl(x) for gemm in pool],  # noqa: B023 (called in this turn)
                lambda: [gemm.onednn(x) for gemm in pool],  # noqa: B023
            )
            if mkl_s >= onednn_s:
                break
            limit = rows
    return limit


def _paired_medians(first, second) -> tuple[float, float]:
    """Median seconds of ``first()`` and ``second()``, timed in alternation after a warm-up."""
    times = ([], [])
    for _ in range(2):
        first(), second()
    for _ in range(PROBE_REPEAT):
        for fn, out in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return tuple(sorted(t)[len(t) // 2] for t in times)
