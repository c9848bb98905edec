"""A model's worth of MoE layers at a few tokens: what a layer costs once its weights stream
from memory, as they do when decoding with a real model.

`moe_layer.py` times one layer over and over. At one token the weights it touches (A: two
experts, 88 MB; B: six experts, the shared one and the router, 48 MB) then stay in a large L3
(300 MB on the benchmark's Xeon) from one call to the next, which no layer of a real model sees:
by the time the next token reaches a layer, the other layers' weights have evicted its own.
Here --layers of a config's transformers block (default 8: 2.8 GB for A, 3.2 GB for B), each
with weights drawn from its own seed, run as one model, ``x = x + block(x) / 2`` per layer, and
every call takes the next of --inputs seeded random inputs, so the experts chosen change from
call to call as they do from token to token. Times are per layer (a call's time over --layers).

Rows: eager transformers with its default experts implementation, and moec's default lowering
of each target compiled from the same model, at each of --precisions: the fp32 default, and
weight-only quantised experts (int8 with a scale per row, int4 with a scale per block along the
input dim; `moec.compile(quantize=..., block_size=...)`, calibrated on seeded inputs like the
benchmark's). Each artifact is first checked (relative L2): the fp32 one against eager, a
quantised one against the model its lossy passes produced (the dequantised model, rebuilt by
`apply_compressed`), the quantisation error against eager given beside it. Then every artifact
of a target and its baseline are timed in --rounds rounds, in a seeded order each (median of
--repeat calls per round, fewer where they would take over --budget-s: a row many times slower
than its baseline needs no fine timing), and the rounds paired with a one-sided sign test
(`moe_layer_targets`): faster, slower, or tied within the host's noise (with 9 rounds, 8 won are
significant, 7 are not). fp32 is paired with eager on --layers layers; the quantised precisions
with fp32 on a model of --quant-layers layers (a lossy compile copies the model several times; with
--quant-layers equal to --layers, one model and eager beside every row). Targets (the issue's,
printed met or not): int4 and int8 speed-ups over the fp32 default on ``ort`` at one token.
Memory floor: the weights one call touches (per layer, mean over the inputs: router, the
distinct chosen experts, shared expert) over the bandwidth of a large copy, as in
`moe_layer.py`, measured once every round; a quantised expert counts what its weights store
(codes at bits/8 bytes, a float32 scale and, asymmetric, a zero point of bits/8 bytes per block).

    python bench/moe_decode.py [--configs A B] [--tokens 1 16] [--layers 8] [--inputs 8]
                               [--repeat 7] [--rounds 9] [--precisions fp32 int8 int4]
                               [--quant-layers 2] [--budget-s 1]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from moe_layer import (
    SETTLE_S,
    SHAPES,
    THREADS,
    BandwidthProbe,
    as_array,
    build_block,
    routed_counts_per_call,
)
from moe_layer import touched_bytes as layer_touched_bytes  # per layer, from its counts
from moe_layer_targets import paired_rounds
from rich.console import Console
from rich.table import Table
from torch.export import Dim

import moec
from moec import timing
from moec.passes.compress import apply_compressed
from moec.settings import QUANTIZE_BITS

TARGETS = ("ort", "onnx", "torch")
# compile keywords per precision: the fp32 default, int8 one scale per row, int4 per block
PRECISIONS = {
    "fp32": {},
    "int8": {"quantize": "int8", "block_size": 0},
    "int4": {"quantize": "int4", "block_size": 32},
}
SPEEDUP_TARGETS = {"int4": 2.5, "int8": 1.6}  # the issue's: over fp32, ort, one token
CALIB_ROWS, CALIB_T = 8, 16  # the lossy passes' calibration inputs [rows, T, H]


class Layers(torch.nn.Module):
    """``layers`` blocks of a config, weights of their own, each ``x = x + block(x) / 2``."""

    def __init__(self, config: str, layers: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(build_block(config, seed)[0] for seed in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x) / 2
        return x


@dataclass
class Case:
    """The inputs at one token count, eager's outputs for them, and the experts each layer's
    call chooses (rows per expert, one list per block call, over every input)."""

    inputs: list[torch.Tensor]
    refs: list[np.ndarray]
    calls: list[list[int]]

    def touched(self, shape: dict, precision: str) -> float:
        """Bytes of weights one call reads per layer at ``precision`` (mean over calls)."""
        scale = expert_bytes(shape, precision) / expert_bytes(shape, "fp32")
        return statistics.fmean(
            layer_touched_bytes(shape, counts) - distinct_expert_bytes(shape, counts) * (1 - scale)
            for counts in self.calls
        )


def expert_bytes(shape: dict, precision: str) -> float:
    """Bytes one routed expert's three matrices store: float32 weights, or codes at bits/8
    bytes plus a float32 scale and (asymmetric) a zero point of bits/8 bytes per block."""
    h, i = shape["H"], shape["I"]
    quantize = PRECISIONS[precision]
    if not quantize:
        return 3 * h * i * 4
    bits = QUANTIZE_BITS[quantize["quantize"]]
    per_block = 4 + (0 if quantize.get("symmetric") else bits / 8)
    total = 0.0
    for k in (h, h, i):  # gate and up read the hidden size, down the expert size
        blocks = k // quantize["block_size"] if quantize["block_size"] else 1
        total += (h * i // k) * (k * bits / 8 + blocks * per_block)  # N rows of K inputs
    return total


def distinct_expert_bytes(shape: dict, counts: list[int]) -> float:
    return sum(c > 0 for c in counts) * expert_bytes(shape, "fp32")


def make_case(model: Layers, shape: dict, t: int, count: int) -> Case:
    inputs = [
        torch.randn(1, t, shape["H"], generator=torch.Generator().manual_seed(1000 * t + i))
        for i in range(count)
    ]
    refs = []  # eager's outputs, computed in the same calls that record the routing
    calls = routed_counts_per_call(
        model.blocks, lambda: refs.extend(model(x).numpy() for x in inputs)
    )
    return Case(inputs, refs, calls)


def write_calibration(shape: dict, path: Path) -> Path:
    """Seeded inputs like the benchmark's, ``[N, T, H]``: the lossy passes' quality report."""
    rows = torch.randn(CALIB_ROWS, CALIB_T, shape["H"], generator=torch.Generator().manual_seed(7))
    np.save(path, rows.numpy())
    return path


@dataclass
class Artifact:
    """One compiled precision of a target: its runner, row label and, per token count, the
    outputs of the model it stands for (eager for fp32, the dequantised model otherwise)."""

    precision: str
    label: str
    runner: object
    refs: dict[int, list[np.ndarray]]


def compile_target(model, target, config, precisions, workdir, calib, cases) -> list[Artifact]:
    """Every precision of ``target``: compiled first, one at a time (a lossy compile copies
    the model), then loaded."""
    shape = SHAPES[config]
    compiled = []
    for precision in precisions:
        result = moec.compile(
            model,
            (torch.randn(1, CALIB_T, shape["H"]),),
            target=target,
            output=workdir / f"{config}-{len(model.blocks)}-{target}-{precision}",
            input_names=["x"],
            dynamic_shapes=({1: Dim("tokens")},),
            **(PRECISIONS[precision] and {"calib": calib, **PRECISIONS[precision]}),
        )
        refs = {t: case.refs for t, case in cases.items()}
        if PRECISIONS[precision]:  # the model the passes produced, not eager fp32
            reference = apply_compressed(model, result.manifest.compression, result.path)
            with torch.no_grad():
                refs = {t: [reference(x).numpy() for x in c.inputs] for t, c in cases.items()}
            del reference
        lowerings = ",".join(sorted({b.lowering for b in result.blocks}))
        compiled.append((precision, f"moec {target}/{lowerings} {precision}", result.path, refs))
        gc.collect()
    options = {"threads": THREADS} if target == "torch" else {"intra_op_threads": THREADS}
    return [
        Artifact(precision, label, moec.load(path, **options), refs)
        for precision, label, path, refs in compiled
    ]


def sections(args) -> list[tuple[int, list[str], bool]]:
    """(layers, precisions, time eager) per model benched: fp32 against eager at --layers; the
    quantised precisions against fp32 at --quant-layers (the same model where they agree)."""
    quantised = [p for p in PRECISIONS if PRECISIONS[p] and p in args.precisions]
    fp32 = ["fp32"] if "fp32" in args.precisions else []
    if not quantised:
        return [(args.layers, fp32, True)]
    if args.quant_layers == args.layers:
        return [(args.layers, ["fp32", *quantised], True)]
    baseline = [(args.layers, fp32, True)] if fp32 else []
    return [*baseline, (args.quant_layers, ["fp32", *quantised], False)]


def bench_config(config: str, args, workdir: Path, probe: BandwidthProbe) -> list[dict]:
    shape = SHAPES[config]
    calib = write_calibration(shape, workdir / f"{config}-calib.npy")
    rows = []
    for layers, precisions, eager in sections(args):
        model = Layers(config, layers).eval()
        cases = {t: make_case(model, shape, t, args.inputs) for t in args.tokens}
        for target in TARGETS:
            artifacts = compile_target(model, target, config, precisions, workdir, calib, cases)
            for t, case in cases.items():
                cell = dict(config=config, layers=layers, tokens=t, target=target)
                rows += bench_cell(
                    model if eager else None, artifacts, case, shape, cell, args, probe
                )
            del artifacts
            gc.collect()
        del model, cases
        gc.collect()
    return rows


def rel_l2(runner, inputs: list[torch.Tensor], refs: list[np.ndarray]) -> float:
    return max(
        float(np.linalg.norm(as_array(runner(x.numpy())) - ref) / np.linalg.norm(ref))
        for x, ref in zip(inputs, refs, strict=True)
    )


def calls_per_round(fn, args) -> int:
    """--repeat calls, fewer (at least one) where they would take over --budget-s: a row many
    times slower than its baseline needs no fine timing, and would hold up the run."""
    start = time.perf_counter()
    fn()
    return max(1, min(args.repeat, int(args.budget_s / (time.perf_counter() - start))))


def timed_ms(fn, calls: int) -> float:
    """Median ms of ``calls`` calls after a pause (ORT's spinning threads) and a warm-up."""
    time.sleep(SETTLE_S)
    return timing.median_ms(fn, calls, warmup=1 if calls < 3 else 2)


def bench_cell(model, artifacts, case: Case, shape, cell: dict, args, probe) -> list[dict]:
    """Every precision of one target on ``case`` (and eager transformers, given its
    ``model``), in rounds of a seeded order each: fp32 paired with eager, each quantised
    precision with fp32."""
    candidates = {}
    if model is not None:
        eager_inputs = itertools.cycle(case.inputs)
        candidates["eager"] = lambda: model(next(eager_inputs))
    for a in artifacts:
        it = itertools.cycle(case.inputs)
        candidates[a.precision] = lambda it=it, r=a.runner: r(next(it).numpy())
    checked = {
        a.precision: rel_l2(a.runner, case.inputs, a.refs[cell["tokens"]]) for a in artifacts
    }
    samples = {name: [] for name in candidates}
    copy_bw = []
    with torch.no_grad():
        calls = {name: calls_per_round(fn, args) for name, fn in candidates.items()}
        for round_ in range(args.rounds):
            seed = f"{cell['config']}-{cell['tokens']}-{cell['target']}-{round_}"
            copy_bw.append(probe.copy())
            for name in random.Random(seed).sample(list(candidates), len(candidates)):
                samples[name].append(timed_ms(candidates[name], calls[name]))
    ms = {name: statistics.median(s) / cell["layers"] for name, s in samples.items()}
    bandwidth = statistics.median(copy_bw)
    rows = []
    for a in artifacts:
        floor_ms = case.touched(shape, a.precision) / bandwidth * 1e3
        row = cell | dict(
            precision=a.precision,
            row=a.label,
            ms_per_layer=ms[a.precision],
            round_ms=samples[a.precision],
            calls_per_round=calls[a.precision],
            touched_mb_per_layer=case.touched(shape, a.precision) / 1e6,
            memory_floor_ms=floor_ms,
            vs_memory_floor=ms[a.precision] / floor_ms,
            rel_l2=checked[a.precision],
        )
        if "eager" in samples:
            eager_floor_ms = case.touched(shape, "fp32") / bandwidth * 1e3
            row |= dict(
                eager_ms_per_layer=ms["eager"],
                speedup_vs_transformers=ms["eager"] / ms[a.precision],
                paired=paired_rounds(samples[a.precision], samples["eager"]),
                eager_round_ms=samples["eager"],
                eager_vs_memory_floor=ms["eager"] / eager_floor_ms,
            )
        if PRECISIONS[a.precision]:
            row |= dict(
                fp32_ms_per_layer=ms["fp32"],
                speedup_vs_fp32=ms["fp32"] / ms[a.precision],
                paired_vs_fp32=paired_rounds(samples[a.precision], samples["fp32"]),
                fp32_round_ms=samples["fp32"],
                rel_l2_vs_eager_fp32=rel_l2(a.runner, case.inputs, case.refs),
            )
        rows.append(row)
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's decode targets: each quantised precision's speed-up over the fp32 default
    on the ``ort`` target at one token, per config."""
    checks = []
    for r in rows:
        goal = SPEEDUP_TARGETS.get(r["precision"])
        if goal is None or r["target"] != "ort" or r["tokens"] != 1 or "speedup_vs_fp32" not in r:
            continue
        checks.append(
            dict(
                config=r["config"],
                precision=r["precision"],
                target=goal,
                speedup_vs_fp32=r["speedup_vs_fp32"],
                paired_vs_fp32=r["paired_vs_fp32"],
                met=r["speedup_vs_fp32"] >= goal,
            )
        )
    return checks


def print_table(rows: list[dict], checks: list[dict], args) -> None:
    table = Table(
        "config",
        "layers",
        "T",
        "row",
        "ms / layer",
        "eager",
        "speed-up vs eager (rounds faster)",
        "vs fp32 (rounds faster)",
        "vs memory floor (eager)",
        "rel L2",
        title=(
            f"{THREADS} threads, {args.inputs} rotating inputs; median of up to {args.repeat} "
            f"calls (within {args.budget_s} s), median of {args.rounds} rounds; rel L2 against "
            "eager (fp32) or the dequantised model"
        ),
    )
    for r in rows:
        vs_eager, vs_fp32, eager_floor = "-", "-", ""
        if "paired" in r:
            vs_eager = f"{r['speedup_vs_transformers']:.2f}x {_rounds(r['paired'])}"
            eager_floor = f" ({r['eager_vs_memory_floor']:.2f})"
        if "paired_vs_fp32" in r:
            vs_fp32 = f"{r['speedup_vs_fp32']:.2f}x {_rounds(r['paired_vs_fp32'])}"
        table.add_row(
            r["config"],
            str(r["layers"]),
            str(r["tokens"]),
            r["row"],
            f"{r['ms_per_layer']:.2f}",
            f"{r['eager_ms_per_layer']:.2f}" if "paired" in r else "-",
            vs_eager,
            vs_fp32,
            f"{r['vs_memory_floor']:.2f}{eager_floor}",
            f"{r['rel_l2']:.1e}",
        )
    console = Console(width=160)
    console.print(table)
    for c in checks:
        p = c["paired_vs_fp32"]
        console.print(
            f"target: {c['config']} ort T=1 {c['precision']} >= {c['target']}x fp32: "
            f"{c['speedup_vs_fp32']:.2f}x ({p['won']}/{p['rounds']} rounds faster) "
            f"{'met' if c['met'] else 'not met'}"
        )


def _rounds(paired: dict) -> str:
    return f"{paired['won']}/{paired['rounds']} ({paired['verdict']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["A", "B"], choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--quant-layers", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=1.0)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS)
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/moe_decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    probe, rows = BandwidthProbe(), []
    with tempfile.TemporaryDirectory(prefix="moec-bench-decode-") as workdir:
        for config in args.configs:
            rows += bench_config(config, args, Path(workdir), probe)
    order = list(PRECISIONS)
    rows.sort(
        key=lambda r: (
            r["config"],
            -r["layers"],
            r["tokens"],
            TARGETS.index(r["target"]),
            order.index(r["precision"]),
        )
    )
    checks = check_targets(rows)
    print_table(rows, checks, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        k: getattr(args, k)
        for k in ("layers", "quant_layers", "inputs", "repeat", "rounds", "budget_s", "precisions")
    }
    meta |= {"precision_options": {p: PRECISIONS[p] for p in args.precisions}}
    meta |= {"threads": THREADS, "torch": torch.__version__}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows, "targets": checks}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
