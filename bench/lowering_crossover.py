"""Where each target's exact lowerings cross over: the data behind the default-lowering rule.

For each block shape of a grid (tiny zoo-like blocks up to the Mixtral-like and DeepSeek-like
layers of `moe_layer.py`) and each target that has two exact candidates (``ort``: fused and
gather; ``torch``: kernel and grouped_mm), times both on one block of random weights at T = 1,
16 and 256 tokens (round-robin rounds, each figure the median of its rounds), exactly as
``moec compile --autotune`` times them, and reports per shape the time of each relative to the
faster (geometric mean over T). Each (shape, target) runs in its own process. Writes
``bench/results/lowering_crossover.json``; the size bounds of the targets' default rules
(`moec.registry.Prefer`) are read off it.

    python bench/lowering_crossover.py [--shapes tiny-8 A] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "lowering_crossover.json"
# name: hidden H, expert width I, experts E, top-k, routing ("softmax" top-k or "grouped"
# DeepSeek-style sigmoid with 8 groups choosing 4, renormalised), shared expert width
SHAPES = {
    "tiny-8": dict(H=64, I=32, E=8, k=2, routing="softmax", shared=0),
    "tiny-16g": dict(H=64, I=32, E=16, k=4, routing="grouped", shared=64),
    "small-8": dict(H=256, I=512, E=8, k=2, routing="softmax", shared=0),
    "small-64g": dict(H=256, I=128, E=64, k=6, routing="grouped", shared=256),
    "mid-8": dict(H=512, I=1792, E=8, k=2, routing="softmax", shared=0),
    "mid-64g": dict(H=512, I=256, E=64, k=6, routing="grouped", shared=512),
    "A": dict(H=1024, I=3584, E=8, k=2, routing="softmax", shared=0),
    "B": dict(H=1024, I=512, E=64, k=6, routing="grouped", shared=1024),
}
TARGETS = ("ort", "torch")  # the targets with two exact candidates (their `autotune` entries)
TOKENS = (1, 16, 256)  # as `moec.compiler.autotune.TIMED_TOKENS`


def block_spec(shape: dict):
    from moec.ir import MoESpec

    grouped = shape["routing"] == "grouped"
    return MoESpec(
        num_experts=shape["E"],
        top_k=shape["k"],
        hidden_size=shape["H"],
        expert_size=shape["I"],
        score="sigmoid" if grouped else "softmax",
        norm_topk_prob=grouped,
        n_group=8 if grouped else 1,
        topk_group=4 if grouped else 1,
        group_score="top2_sum" if grouped else "max",
        shared_expert_size=shape["shared"],
    )


def present_weights(spec) -> set[str]:
    names = {"router_weight", "w_gate", "w_up", "w_down"}
    if spec.n_group > 1:
        names.add("selection_bias")
    if spec.shared_expert_size:
        names |= {"shared_gate", "shared_up", "shared_down"}
    return names


def child(name: str, target: str, rounds: int) -> dict:
    import torch

    from moec import registry
    from moec.compiler.autotune import TIMED_TOKENS, measure_lowerings
    from moec.timing import relative_times

    torch.set_num_threads(os.cpu_count() or 1)
    spec = block_spec(SHAPES[name])
    entry = registry.target(target)
    present = present_weights(spec)
    per_size = measure_lowerings(spec, present, list(entry.autotune), entry, TIMED_TOKENS, rounds)
    return {
        "shape": name,
        "target": target,
        **SHAPES[name],
        "ms": {k: [round(t * 1e3, 4) for t in v] for k, v in per_size.items()},
        "relative": {k: round(v, 4) for k, v in relative_times(per_size).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.rounds)))
        return
    from rich.console import Console
    from rich.table import Table

    from moec.timing import cpu_model

    rows, start = [], time.time()
    for name in args.shapes:
        for target in args.targets:
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, target, "--rounds", str(args.rounds)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    table = Table("shape", "H", "I", "E", "k", "target", *(f"ms T={t}" for t in TOKENS), "relative")
    for r in rows:
        for lowering, ms in r["ms"].items():
            table.add_row(
                r["shape"],
                str(r["H"]),
                str(r["I"]),
                str(r["E"]),
                str(r["k"]),
                f"{r['target']} {lowering}",
                *(f"{m:.3f}" for m in ms),
                f"{r['relative'][lowering]:.2f}",
            )
    Console().print(table)
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python bench/lowering_crossover.py",
                "cpu": cpu_model(),
                "threads": os.cpu_count(),
                "tokens": list(TOKENS),
                "rounds": args.rounds,
                "seconds": round(time.time() - start, 1),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
