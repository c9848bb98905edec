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
of each target compiled from the same model. Each artifact is checked against eager (relative
L2), then timed in --rounds rounds alternating with eager in a seeded order (median of --repeat
calls per round), and the rounds paired with a one-sided sign test (`moe_layer_targets`): faster,
slower, or tied within the host's noise (with 9 rounds, 8 won are significant, 7 are not); one
artifact is loaded at a time, so memory holds two copies of the weights.
Memory floor: the weights one call touches (per layer, mean over the inputs: router, the
distinct chosen experts, shared expert) over the bandwidth of a large copy, as in
`moe_layer.py`, measured in every round.

    python bench/moe_decode.py [--configs A B] [--tokens 1 16] [--layers 8] [--inputs 8]
                               [--repeat 7] [--rounds 9]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from moe_layer import (
    SHAPES,
    THREADS,
    BandwidthProbe,
    as_array,
    build_block,
    routed_counts_per_call,
    settled_median_ms,
)
from moe_layer import touched_bytes as layer_touched_bytes  # per layer, from its counts
from moe_layer_targets import paired_rounds
from rich.console import Console
from rich.table import Table
from torch.export import Dim

import moec

TARGETS = ("ort", "onnx", "torch")


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
    """The inputs at one token count, eager's outputs for them, and the bytes of weights one
    call reads per layer (mean over layers and inputs)."""

    inputs: list[torch.Tensor]
    refs: list[np.ndarray]
    touched: float


def make_case(model: Layers, shape: dict, t: int, count: int) -> Case:
    inputs = [
        torch.randn(1, t, shape["H"], generator=torch.Generator().manual_seed(1000 * t + i))
        for i in range(count)
    ]
    refs = []  # eager's outputs, computed in the same calls that record the routing
    calls = routed_counts_per_call(
        model.blocks, lambda: refs.extend(model(x).numpy() for x in inputs)
    )
    touched = statistics.fmean(layer_touched_bytes(shape, counts) for counts in calls)
    return Case(inputs, refs, touched)


def bench_config(config: str, args, workdir: Path, probe: BandwidthProbe) -> list[dict]:
    shape = SHAPES[config]
    model = Layers(config, args.layers).eval()
    cases = {t: make_case(model, shape, t, args.inputs) for t in args.tokens}
    rows = []
    for target in TARGETS:
        result = moec.compile(
            model,
            (torch.randn(1, 16, shape["H"]),),
            target=target,
            output=workdir / f"{config}-{target}",
            input_names=["x"],
            dynamic_shapes=({1: Dim("tokens")},),
        )
        options = {"threads": THREADS} if target == "torch" else {"intra_op_threads": THREADS}
        runner = moec.load(result.path, **options)
        label = f"moec {target}/{','.join(sorted({b.lowering for b in result.blocks}))} *"
        for t, case in cases.items():
            row = dict(config=config, tokens=t, target=target, row=label)
            rows.append(row | bench_pair(model, runner, case, row, args, probe))
        del runner
        gc.collect()
    return rows


def bench_pair(model, runner, case: Case, row: dict, args, probe) -> dict:
    """The artifact and eager transformers on ``case``, in alternating rounds."""
    rel_l2 = max(
        float(np.linalg.norm(as_array(runner(x.numpy())) - ref) / np.linalg.norm(ref))
        for x, ref in zip(case.inputs, case.refs, strict=True)
    )
    eager_inputs, artifact_inputs = itertools.cycle(case.inputs), itertools.cycle(case.inputs)
    candidates = {
        "eager": lambda: model(next(eager_inputs)),
        "artifact": lambda: runner(next(artifact_inputs).numpy()),
    }
    samples = {name: [] for name in candidates}
    copy_bw = []
    with torch.no_grad():
        for round_ in range(args.rounds):
            seed = f"{row['config']}-{row['tokens']}-{row['target']}-{round_}"
            for name in random.Random(seed).sample(list(candidates), len(candidates)):
                copy_bw.append(probe.copy())
                samples[name].append(settled_median_ms(candidates[name], args.repeat))
    eager_ms, artifact_ms = (statistics.median(samples[n]) / args.layers for n in candidates)
    floor_ms = case.touched / statistics.median(copy_bw) * 1e3
    return dict(
        ms_per_layer=artifact_ms,
        eager_ms_per_layer=eager_ms,
        speedup_vs_transformers=eager_ms / artifact_ms,
        paired=paired_rounds(samples["artifact"], samples["eager"]),
        round_ms=samples["artifact"],
        eager_round_ms=samples["eager"],
        touched_mb_per_layer=case.touched / 1e6,
        memory_floor_ms=floor_ms,
        vs_memory_floor=artifact_ms / floor_ms,
        eager_vs_memory_floor=eager_ms / floor_ms,
        rel_l2=rel_l2,
    )


def print_table(rows: list[dict], args) -> None:
    table = Table(
        "config",
        "T",
        "row",
        "ms / layer",
        "eager transformers",
        "speed-up",
        "rounds faster (sign test)",
        "vs memory floor (eager)",
        "rel L2",
        title=(
            f"{args.layers} layers, fp32, {THREADS} threads, {args.inputs} rotating inputs; "
            f"median of {args.repeat} calls, median of {args.rounds} rounds"
        ),
    )
    for r in rows:
        table.add_row(
            r["config"],
            str(r["tokens"]),
            r["row"],
            f"{r['ms_per_layer']:.2f}",
            f"{r['eager_ms_per_layer']:.2f}",
            f"{r['speedup_vs_transformers']:.2f}x",
            f"{r['paired']['won']}/{r['paired']['rounds']} ({r['paired']['verdict']})",
            f"{r['vs_memory_floor']:.2f} ({r['eager_vs_memory_floor']:.2f})",
            f"{r['rel_l2']:.1e}",
        )
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["A", "B"], choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, default=Path("bench/results/moe_decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    probe, rows = BandwidthProbe(), []
    with tempfile.TemporaryDirectory(prefix="moec-bench-decode-") as workdir:
        for config in args.configs:
            rows += bench_config(config, args, Path(workdir), probe)
    rows.sort(key=lambda r: (r["config"], r["tokens"], TARGETS.index(r["target"])))
    print_table(rows, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(args, k) for k in ("layers", "inputs", "repeat", "rounds")}
    meta |= {"threads": THREADS, "torch": torch.__version__}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
