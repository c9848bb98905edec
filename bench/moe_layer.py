"""One MoE layer, every way users run it today and every moec lowering, in one run.

Configs (fp32, 2 threads, input [1, T, 1024]):
  A  Mixtral-like: 8 experts of 3584, top-2 (transformers' MixtralSparseMoeBlock);
  B  DeepSeek-like: 64 experts of 512, top-6 in 4 of 8 groups, one shared expert of 1024
     (transformers' DeepseekV3MoE).
Rows: eager transformers with its default experts implementation (grouped_mm), the eager loop,
torch.compile of the eager block, ONNX Runtime on a plain torch.onnx.export of the batched_mm
implementation (where its per-token weight copies fit in memory), and moec compiled from the same
block for each target and lowering (``*`` marks each target's default). Every row is first
checked against eager transformers (relative L2), then timed: median of --repeat runs. A burst
of load on a shared host can double a run's time for seconds, so every row, the GEMMs alone, the
compute floor and both bandwidths are measured in round-robin rounds (--rounds at T <= 16,
where a run takes milliseconds; --large-rounds above), and each figure is the median of its
rounds (the JSON keeps every round's figure of each row and of the compute floor). The rows
take their turns in a new seeded order each round, seeded by config, T and round (so a row's
place differs from cell to cell too): in a fixed order, a row always timed right after the ONNX
rows came out slower than an identical row after it. Fifteen rounds at T <= 16, where a round
takes seconds, and five above, so that two bursts of load cannot set a row's median. (The
observations behind these choices are in docs/performance.md.)

Floors measured in the same run: compute = the same FLOPs as one dense chain of matmuls
([T*k, H] x [H, 2I], gate and up as one matrix, then [T*k, I] x [I, H], plus the shared
expert on T rows), timed in both PyTorch and ONNX Runtime, the faster counting; memory = bytes
of the weights the tokens touch (chosen experts, router, shared expert) over the bandwidth
of a large copy (bytes read + written, as STREAM counts it), measured right before each row is
timed, the median of those measurements standing for every row of the same T (a shared host's
copy bandwidth can flip from one second to the next while reading stays steady; one
measurement per T made the floor a coin toss). For reference the table
also gives each row against a read floor: the same bytes over the bandwidth of summing a large
tensor (reading only, which is what streaming weights does), measured the same way; and
against the GEMMs alone: each expert's matrix products on as many rows as the router gives it
for this input (and the shared expert's), no routing, gathering or combining, timed on packed
weights (as the torch target runs them: oneDNN, or MKL on a few rows), as transformers runs
them (torch._grouped_mm on its stored weights), and as PyTorch and ONNX Runtime MatMul chains
(gate and up as one matrix), the fastest counting; where a default is not faster than a
baseline, the targets give its own kernel's GEMMs and transformers' beside it. Where the GEMMs
alone are already well above the memory floor, what stands between a lowering and that floor is
this machine's GEMMs on a few rows, not the lowering.
At T <= 16 the torch target's default is also split (moe_layer_profile.py): the GEMMs one call
makes, alone, and the program with those GEMMs replaced by their recorded outputs (its other ops
alone, on warm caches); their sum is a lower bound on the program. One small op is timed on warm
caches and right after 64 MiB have streamed through them, which is what every small op between
the GEMMs meets in the timed runs.
Peak memory: the most the process's anonymous memory grows during a row's first call (sampled),
plus the layer's weights, over weights + activations (weights that ONNX Runtime memory-maps from
the artifact's external data and pages in on first use are the weights, not growth).

    python bench/moe_layer.py [--configs A B] [--tokens 1 16 512 2048] [--repeat 7]
                              [--rounds 15] [--large-rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from moe_layer_profile import idle_matmul_us, small_op_us, torch_split
from moe_layer_targets import SMALL_T, check_targets, print_targets
from rich.console import Console
from rich.table import Table
from torch.export import Dim

import moec
from moec import timing
from moec.ir import MoEWeights
from moec.models.adapters import find_moe_blocks
from moec.runtime.weight_packing import PackedMoE
from moec.timing import median_ms

THREADS = 2
SETTLE_S = 0.3
SPLIT_REPEAT = 51  # rounds of the torch target's split
BATCHED_MM_BUDGET = 4 << 30  # bytes of per-token weight copies the batched_mm export may make
MOEC_ROWS = [  # (target, lowering or None for the target's default)
    ("ort", None),
    ("ort", "fused"),
    ("ort", "gather"),
    ("ort", "dense"),
    ("ort", "capacity"),
    ("onnx", None),
    ("onnx", "dense"),
    ("onnx", "capacity"),
    ("torch", None),
    ("torch", "kernel"),
    ("torch", "grouped_mm"),
]


# E experts of width I, top-k, a shared expert of width Is (0: none), hidden H
SHAPES = {
    "A": dict(E=8, k=2, I=3584, Is=0, H=1024),
    "B": dict(E=64, k=6, I=512, Is=1024, H=1024),
}


def build_block(config: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The transformers block of the config, weights N(0, 0.02) drawn from ``seed``, default
    experts implementation."""
    shape = SHAPES[config]
    if config == "A":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(
            hidden_size=shape["H"],
            intermediate_size=shape["I"],
            num_local_experts=shape["E"],
            num_experts_per_tok=shape["k"],
        )
        block = MixtralSparseMoeBlock(cfg)
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        cfg = DeepseekV3Config(
            hidden_size=shape["H"],
            moe_intermediate_size=shape["I"],
            n_routed_experts=shape["E"],
            num_experts_per_tok=shape["k"],
            n_shared_experts=shape["Is"] // shape["I"],
            n_group=8,
            topk_group=4,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
        block = DeepseekV3MoE(cfg)
    cfg._experts_implementation = "grouped_mm"  # what a full model gets by default
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for b in block.buffers():
            b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    return block.eval(), dict(shape)


def settled_median_ms(fn, repeat: int) -> float:
    """`moec.timing.settled_median_ms` with this benchmark's longer pause (its rows hold
    several ONNX Runtime sessions whose worker threads spin after a run)."""
    return timing.settled_median_ms(fn, repeat, SETTLE_S)


class PeakRss:
    """Highest anonymous resident memory while the block runs, sampled every millisecond.

    Anonymous only: an ONNX artifact's weights stored as external data are memory-mapped by
    ONNX Runtime and paged in from the file on first use; those pages are the layer's weights
    themselves (one copy, file-backed, which the kernel can drop), not memory the row allocates."""

    def __enter__(self):
        self.process = psutil.Process()
        self.base = self.peak = self._anonymous()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _anonymous(self) -> int:
        info = self.process.memory_info()
        return info.rss - info.shared

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._anonymous())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def grown(self) -> int:
        return self.peak - self.base


class BandwidthProbe:
    """Copy and read bandwidth of 512 MiB tensors, allocated once for the whole run."""

    def __init__(self):
        self.src = torch.empty(128 << 20)
        self.src.normal_()
        self.dst = torch.empty_like(self.src)
        self.bytes = self.src.numel() * 4

    def copy(self) -> float:
        """Bytes per second moved (read + written) by a copy."""
        return 2 * self.bytes / (median_ms(lambda: self.dst.copy_(self.src), 7) / 1e3)

    def read(self) -> float:
        """Bytes per second read by a sum."""
        return self.bytes / (median_ms(self.src.sum, 7) / 1e3)


def compute_floor(shape: dict, tokens: int) -> MatMulChains:
    """The layer's FLOPs as one dense chain (routed pairs, then the shared expert on T rows)."""
    chains = [(tokens * shape["k"], shape["I"])]
    return MatMulChains(shape["H"], chains + _shared_chain(shape, tokens))


def _shared_chain(shape: dict, tokens: int) -> list[tuple[int, int]]:
    return [(tokens, shape["Is"])] if shape["Is"] else []


class MatMulChains:
    """silu(a[:, :w]) * a[:, w:] @ w2 with a = x @ w13 (gate and up as one [h, 2w] matrix, as
    moec's lowerings hold them) for each (rows, w) chain, x [rows, h], in PyTorch and in an ONNX
    Runtime session built once."""

    def __init__(self, h: int, chains: list[tuple[int, int]]):
        g = torch.Generator().manual_seed(3)
        self.tensors = [
            (
                torch.randn(rows, h, generator=g),
                torch.randn(h, 2 * width, generator=g),
                torch.randn(width, h, generator=g),
            )
            for rows, width in chains
        ]
        self.session, self.feeds = _ort_chain(self.tensors)

    def _torch(self) -> None:
        for x, w13, w2 in self.tensors:
            gate, up = (x @ w13).chunk(2, dim=-1)
            (torch.nn.functional.silu(gate) * up) @ w2

    def ms(self, repeat: int) -> dict[str, float]:
        """{"torch matmul": ms, "ort matmul": ms}."""
        with torch.no_grad():
            torch_ms = settled_median_ms(self._torch, repeat)
        ort_ms = settled_median_ms(lambda: self.session.run(None, self.feeds), repeat)
        return {"torch matmul": torch_ms, "ort matmul": ort_ms}


def _ort_chain(tensors):
    """An ONNX Runtime session computing each chain of `MatMulChains`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inputs, outputs, weights, feeds = [], [], [], [], {}
    for n, (x, w13, w2) in enumerate(tensors):
        names = [f"{p}_{n}" for p in ("x", "w13", "w2", "a", "gate", "up", "s", "silu", "h", "y")]
        xn, w13n, w2n, a, gate, up, sg, silu, hid, y = names
        inputs.append(helper.make_tensor_value_info(xn, TensorProto.FLOAT, list(x.shape)))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
        weights += [numpy_helper.from_array(t.numpy(), nm) for t, nm in ((w13, w13n), (w2, w2n))]
        nodes += [
            helper.make_node("MatMul", [xn, w13n], [a]),
            helper.make_node("Split", [a], [gate, up], axis=1, num_outputs=2),
            helper.make_node("Sigmoid", [gate], [sg]),
            helper.make_node("Mul", [gate, sg], [silu]),
            helper.make_node("Mul", [silu, up], [hid]),
            helper.make_node("MatMul", [hid, w2n], [y]),
        ]
        feeds[xn] = x.numpy()
    graph = helper.make_graph(nodes, "floor", inputs, outputs, initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session, feeds


def routed_counts(block, x: torch.Tensor) -> list[int]:
    """Rows each expert gets for ``x`` (from the block's own router)."""
    return routed_counts_per_call([block], lambda: block(x))[0]


def routed_counts_per_call(blocks, run) -> list[list[int]]:
    """Rows each expert of ``blocks`` gets, one list per block call, while ``run()`` runs."""
    calls = []

    def record(module, args):
        calls.append(torch.bincount(args[1].reshape(-1), minlength=module.num_experts).tolist())

    handles = [block.experts.register_forward_pre_hook(record) for block in blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def as_array(out) -> np.ndarray:
    """A runner's or module's output (its first, if several) as a numpy array."""
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out.numpy() if isinstance(out, torch.Tensor) else out


def touched_bytes(shape: dict, counts: list[int]) -> int:
    """Bytes of weights one call reads: router, the distinct chosen experts, shared expert."""
    h, i, e = shape["H"], shape["I"], shape["E"]
    per_expert = 3 * h * i * 4
    return sum(c > 0 for c in counts) * per_expert + e * h * 4 + 3 * h * shape["Is"] * 4


class ExpertGemms:
    """The layer's matrix products alone: each expert's on as many rows as the router gives it,
    the shared expert's on all T rows; no routing, gathering or combining. Timed on packed
    weights (as moec's torch target runs them, `PackedGemm`), as transformers runs them
    (``torch._grouped_mm`` on its stored [E, out, in] weights, the shared expert's nn.Linear
    layers), and as chains of PyTorch and ONNX Runtime MatMuls (`MatMulChains`); the fastest
    counts."""

    def __init__(self, block, shape: dict):
        match = find_moe_blocks(block)[0]
        self.experts = PackedMoE(match.spec, match.weights)
        self.shape = shape
        mlp = getattr(block, "shared_experts", None)  # a SwiGLU MLP: one expert on every row
        self.stored = (block.experts.gate_up_proj.detach(), block.experts.down_proj.detach(), mlp)
        self.shared = None
        if mlp is not None:
            spec = dataclasses.replace(match.spec, num_experts=1, top_k=1, expert_size=shape["Is"])
            layers = {"w_gate": mlp.gate_proj, "w_up": mlp.up_proj, "w_down": mlp.down_proj}
            weights = MoEWeights(None, **{n: m.weight.detach()[None] for n, m in layers.items()})
            self.shared = PackedMoE(spec, weights)

    def timer(self, counts: list[int], tokens: int):
        """``ms(repeat) -> {"packed" | "grouped_mm" | "torch matmul" | "ort matmul": ms}`` for
        this routing, its inputs and sessions built once."""
        g = torch.Generator().manual_seed(5)
        rows = torch.randn(sum(counts), self.shape["H"], generator=g)
        x = torch.randn(tokens, self.shape["H"], generator=g)
        chains = [(c, self.shape["I"]) for c in counts if c] + _shared_chain(self.shape, tokens)
        matmuls = MatMulChains(self.shape["H"], chains)
        offsets = torch.tensor(counts).cumsum(0).to(torch.int32)

        def packed():
            self.experts.experts(rows, counts)
            if self.shared is not None:
                self.shared.experts(x, [tokens])

        def grouped_mm():
            gate_up, down, mlp = self.stored
            gate, up = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets).chunk(2, -1)
            hidden = torch.nn.functional.silu(gate) * up
            torch._grouped_mm(hidden, down.transpose(1, 2), offs=offsets)
            if mlp is not None:
                mlp(x)

        def ms(repeat: int) -> dict[str, float]:
            with torch.no_grad():
                packed_ms = settled_median_ms(packed, repeat)
                grouped_ms = settled_median_ms(grouped_mm, repeat)
            return {"packed": packed_ms, "grouped_mm": grouped_ms, **matmuls.ms(repeat)}

        return ms


def transformers_rows(block, x: torch.Tensor):
    """(name, callable) for what users run today, built on ``block``."""
    experts_config = block.experts.config

    def with_impl(impl):
        def run():
            experts_config._experts_implementation = impl
            try:
                return block(x)
            finally:
                experts_config._experts_implementation = "grouped_mm"

        return run

    yield "eager transformers (grouped_mm)", with_impl("grouped_mm")
    yield "eager loop (experts_implementation=eager)", with_impl("eager")
    compiled = torch.compile(with_impl("eager"), dynamic=True)
    yield "torch.compile (eager block)", compiled


def batched_mm_session(block, shape: dict, workdir: Path):
    """ONNX Runtime on torch.onnx.export of transformers' batched_mm implementation."""
    import onnxruntime as ort

    block.experts.config._experts_implementation = "batched_mm"
    try:
        x = torch.randn(1, 8, shape["H"])
        path = workdir / "batched_mm.onnx"
        torch.onnx.export(
            block,
            (x,),
            str(path),
            dynamo=True,
            input_names=["x"],
            dynamic_shapes=({1: Dim("tokens")},),
            verbose=False,
        )
    finally:
        block.experts.config._experts_implementation = "grouped_mm"
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def moec_artifacts(block, shape: dict, workdir: Path) -> dict:
    x = torch.randn(1, 16, shape["H"])
    artifacts = {}
    for target, lowering in MOEC_ROWS:
        result = moec.compile(
            block,
            (x,),
            target=target,
            lowering=lowering,
            output=workdir / f"{target}-{lowering}",
            input_names=["x"],
            dynamic_shapes=({1: Dim("tokens")},),
        )
        chosen = sorted({b.lowering for b in result.blocks})
        label = f"moec {target}/{','.join(chosen)}" + ("" if lowering else " *")
        options = {"intra_op_threads": THREADS} if target != "torch" else {"threads": THREADS}
        artifacts[label] = moec.load(result.path, **options)
    return artifacts


def bench_config(
    config: str,
    tokens: list[int],
    repeat: int,
    rounds_by_size: tuple[int, int],
    workdir: Path,
    probe: BandwidthProbe,
):
    block, shape = build_block(config)
    weight_bytes = sum(p.numel() * 4 for p in block.parameters())
    rows = []
    workdir = workdir / config
    artifacts = moec_artifacts(block, shape, workdir)
    session = batched_mm_session(block, shape, workdir)
    gemms = ExpertGemms(block, shape)
    for t in tokens:
        x = torch.randn(1, t, shape["H"], generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ref = block(x).numpy()
        floor_chains = compute_floor(shape, t)
        counts = routed_counts(block, x)
        touched = touched_bytes(shape, counts)
        activations = (2 * t * shape["H"] + 3 * t * shape["k"] * shape["I"]) * 4
        candidates = list(transformers_rows(block, x))
        batched_copy = t * shape["k"] * 3 * shape["H"] * shape["I"] * 4
        if batched_copy <= BATCHED_MM_BUDGET:
            run_session = functools.partial(session.run, None, {"x": x.numpy()})
            candidates.append(("ORT on plain export (batched_mm)", run_session))
        else:
            rows.append(
                dict(
                    config=config,
                    tokens=t,
                    row="ORT on plain export (batched_mm)",
                    skipped=f"needs {batched_copy / 2**30:.0f} GiB of weight copies",
                )
            )
        for label, runner in artifacts.items():
            candidates.append((label, functools.partial(runner, x.numpy())))
        checked = {}
        for label, fn in candidates:
            with PeakRss() as peak, torch.no_grad():  # the first call: arenas keep memory
                out = as_array(fn())
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            checked[label] = (err, (weight_bytes + peak.grown) / (weight_bytes + activations))
        # round robin: every row and both bandwidths sampled in each round, so a burst of
        # load on a shared host falls on all of them alike; each round in its own seeded order,
        # so that no row always follows the same one
        rounds = rounds_by_size[0] if t <= SMALL_T else rounds_by_size[1]
        samples = {label: [] for label, _ in candidates}
        gemm_ms, floor_c_ms, copy_bw, read_bw = [], [], [], []
        gemm_timer = gemms.timer(counts, t)
        for round_ in range(rounds):
            for label, fn in random.Random(f"{config}-{t}-{round_}").sample(
                candidates, len(candidates)
            ):
                copy_bw.append(probe.copy())
                read_bw.append(probe.read())
                samples[label].append(settled_median_ms(fn, repeat))
            gemm_ms.append(gemm_timer(repeat))
            floor_c_ms.append(min(floor_chains.ms(repeat).values()))
        timings = {label: statistics.median(ms) for label, ms in samples.items()}
        gemm_kernels = {k: statistics.median(m[k] for m in gemm_ms) for k in gemm_ms[0]}
        floor_g = min(gemm_kernels.values())
        floor_c = statistics.median(floor_c_ms)
        floor_m = touched / statistics.median(copy_bw) * 1e3
        floor_r = touched / statistics.median(read_bw) * 1e3
        split = {  # the torch target's GEMMs alone and the rest alone, at a few tokens
            label: torch_split(runner.module, x, SPLIT_REPEAT)
            for label, runner in artifacts.items()
            if t <= SMALL_T and label.startswith("moec torch") and label.endswith(" *")
        }
        for label, (err, peak_ratio) in checked.items():
            rows.append(
                dict(
                    config=config,
                    tokens=t,
                    row=label,
                    ms=timings[label],
                    rel_l2=err,
                    rounds=rounds,
                    round_ms=samples[label],  # in round order: for ratios paired per round
                    compute_floor_ms=floor_c,
                    compute_floor_round_ms=floor_c_ms,
                    memory_floor_ms=floor_m,
                    read_floor_ms=floor_r,
                    gemm_floor_ms=floor_g,
                    gemm_kernels_ms=gemm_kernels,
                    copy_gb_s=[min(copy_bw) / 1e9, max(copy_bw) / 1e9],
                    peak_ratio=peak_ratio,
                    **({"split": split[label]} if split.get(label) else {}),
                )
            )
    eager = {r["tokens"]: r["ms"] for r in rows if r["row"].startswith("eager transformers")}
    for r in rows:
        if "ms" in r:
            r["vs_compute_floor"] = r["ms"] / r["compute_floor_ms"]
            r["vs_memory_floor"] = r["ms"] / r["memory_floor_ms"]
            r["vs_read_floor"] = r["ms"] / r["read_floor_ms"]
            r["vs_gemm_floor"] = r["ms"] / r["gemm_floor_ms"]
            r["vs_floor"] = r["ms"] / max(r["compute_floor_ms"], r["memory_floor_ms"])
            r["speedup_vs_transformers"] = eager[r["tokens"]] / r["ms"]
    return rows


def print_table(rows: list[dict], repeat: int, rounds: tuple[int, int]) -> None:
    table = Table(
        "cfg",
        "T",
        "row",
        "ms",
        "/ compute floor",
        "/ memory floor",
        "/ read floor",
        "/ GEMMs alone",
        "vs transformers",
        "peak mem",
        "rel L2",
        title=(
            f"MoE layer, fp32, {THREADS} threads: median over {rounds[0]} rounds (T <= "
            f"{SMALL_T}) or {rounds[1]} (above) of the median of {repeat} runs; * = default"
        ),
    )
    for r in rows:
        if "skipped" in r:
            table.add_row(r["config"], str(r["tokens"]), r["row"], *["-"] * 7, r["skipped"])
            continue
        table.add_row(
            r["config"],
            str(r["tokens"]),
            r["row"],
            f"{r['ms']:.2f}",
            f"{r['vs_compute_floor']:.2f}",
            f"{r['vs_memory_floor']:.2f}",
            f"{r['vs_read_floor']:.2f}",
            f"{r['vs_gemm_floor']:.2f}",
            f"{r['speedup_vs_transformers']:.2f}x",
            f"{r['peak_ratio']:.2f}",
            f"{r['rel_l2']:.1e}",
        )
    Console(width=160).print(table)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({r["config"] for r in rows})
    fig, axes = plt.subplots(1, len(configs), figsize=(7 * len(configs), 5), squeeze=False)
    for ax, config in zip(axes[0], configs, strict=True):
        timed = [r for r in rows if r["config"] == config and "ms" in r]
        colors = plt.get_cmap("tab20").colors  # more rows than the default cycle's 10 colours
        for i, label in enumerate(dict.fromkeys(r["row"] for r in timed)):
            pts = sorted((r["tokens"], r["vs_floor"]) for r in timed if r["row"] == label)
            style = "-" if label.startswith("moec") else "--"
            color = colors[i % len(colors)]
            ax.plot(*zip(*pts, strict=True), style, marker="o", color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / max(compute floor, memory floor)")
        ax.set_title(f"config {config}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["A", "B"], choices=["A", "B"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 512, 2048])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=15, help=f"rounds at T <= {SMALL_T}")
    parser.add_argument("--large-rounds", type=int, default=5, help=f"rounds at T > {SMALL_T}")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rows, probe = [], BandwidthProbe()
    with tempfile.TemporaryDirectory(prefix="moec-bench-") as workdir:
        for config in args.configs:
            rows += bench_config(
                config,
                args.tokens,
                args.repeat,
                (args.rounds, args.large_rounds),
                Path(workdir),
                probe,
            )
    print_table(rows, args.repeat, (args.rounds, args.large_rounds))
    small_op = small_op_us(probe.src, probe.dst)
    print(
        "one small op (sigmoid of [1, 64]): "
        + ", ".join(f"{us:.1f} us {when}" for when, us in small_op.items())
    )
    b = SHAPES["B"]
    idle_us = idle_matmul_us(b["H"], b["I"], b["E"], THREADS)
    print(f"one ONNX Runtime MatMul with no rows (an idle expert's node, B): {idle_us:.2f} us")
    targets = check_targets(rows)
    print_targets(targets)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": THREADS,
        "repeat": args.repeat,
        "rounds": {f"T <= {SMALL_T}": args.rounds, f"T > {SMALL_T}": args.large_rounds},
        "torch": torch.__version__,
        "small_op_us": small_op,
        "idle_matmul_us": idle_us,
    }
    (args.out / "moe_layer.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1)
    )
    plot(rows, args.out / "moe_layer.png")
    print(f"wrote {args.out}/moe_layer.json and .png")


if __name__ == "__main__":
    main()
