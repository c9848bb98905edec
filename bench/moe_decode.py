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
calls per round); one artifact is loaded at a time, so memory holds two copies of the weights.
Memory floor: the weights one call touches (per layer, mean over the inputs: router, the
distinct chosen experts, shared expert) over the bandwidth of a large copy, as in
`moe_layer.py`, measured in every round.

    python bench/moe_decode.py [--configs A B] [--tokens 1 16] [--layers 8] [--inputs 8]
                               [--repeat 7] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from moe_layer import SHAPES, THREADS, BandwidthProbe, build_block, settled_median_ms
from moe_layer import touched_bytes as layer_touched_bytes
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


def touched_bytes(model: Layers, shape: dict, inputs: list[torch.Tensor]) -> float:
    """Bytes of weights one call reads per layer, mean over layers and ``inputs``."""
    touched = []

    def record(module, args):
        counts = torch.bincount(args[1].reshape(-1), minlength=shape["E"]).tolist()
        touched.append(layer_touched_bytes(shape, counts))

    handles = [b.experts.register_forward_pre_hook(record) for b in model.blocks]
    with torch.no_grad():
        for x in inputs:
            model(x)
    for handle in handles:
        handle.remove()
    return statistics.fmean(touched)


def bench_config(config: str, args, workdir: Path, probe: BandwidthProbe) -> list[dict]:
    shape = SHAPES[config]
    model = Layers(config, args.layers).eval()
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
        lowering = ",".join(sorted({b.lowering for b in result.blocks}))
        for t in args.tokens:
            rows.append(bench_pair(config, t, target, lowering, model, runner, args, probe))
        del runner
        gc.collect()
    return rows


def bench_pair(config, t, target, lowering, model, runner, args, probe) -> dict:
    """The artifact and eager transformers at ``t`` tokens, in alternating rounds."""
    shape = SHAPES[config]
    inputs = [
        torch.randn(1, t, shape["H"], generator=torch.Generator().manual_seed(1000 * t + i))
        for i in range(args.inputs)
    ]
    with torch.no_grad():
        refs = [model(x).numpy() for x in inputs]
    rel_l2 = max(
        float(np.linalg.norm(_array(runner(x.numpy())) - ref) / np.linalg.norm(ref))
        for x, ref in zip(inputs, refs, strict=True)
    )
    eager_inputs, artifact_inputs = itertools.cycle(inputs), itertools.cycle(inputs)
    candidates = {
        "eager transformers": lambda: model(next(eager_inputs)),
        f"moec {target}/{lowering} *": lambda: runner(next(artifact_inputs).numpy()),
    }
    samples = {label: [] for label in candidates}
    copy_bw = []
    with torch.no_grad():
        for round_ in range(args.rounds):
            order = random.Random(f"{config}-{t}-{target}-{round_}").sample(
                list(candidates), len(candidates)
            )
            for label in order:
                copy_bw.append(probe.copy())
                samples[label].append(settled_median_ms(candidates[label], args.repeat))
    per_layer = {label: statistics.median(ms) / args.layers for label, ms in samples.items()}
    eager_ms, artifact_ms = per_layer.values()
    eager_rounds, artifact_rounds = samples.values()
    touched = touched_bytes(model, shape, inputs)
    floor_ms = touched / statistics.median(copy_bw) * 1e3
    return dict(
        config=config,
        tokens=t,
        target=target,
        row=f"moec {target}/{lowering} *",
        ms_per_layer=artifact_ms,
        eager_ms_per_layer=eager_ms,
        speedup_vs_transformers=eager_ms / artifact_ms,
        rounds_faster=sum(a < e for a, e in zip(artifact_rounds, eager_rounds, strict=True)),
        rounds=args.rounds,
        round_ms=artifact_rounds,
        eager_round_ms=eager_rounds,
        touched_mb_per_layer=touched / 1e6,
        memory_floor_ms=floor_ms,
        vs_memory_floor=artifact_ms / floor_ms,
        eager_vs_memory_floor=eager_ms / floor_ms,
        rel_l2=rel_l2,
    )


def _array(out) -> np.ndarray:
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out.numpy() if isinstance(out, torch.Tensor) else out


def print_table(rows: list[dict], args) -> None:
    table = Table(
        "config",
        "T",
        "row",
        "ms / layer",
        "eager transformers",
        "speed-up",
        "rounds faster",
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
            f"{r['rounds_faster']}/{r['rounds']}",
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
    parser.add_argument("--rounds", type=int, default=5)
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
