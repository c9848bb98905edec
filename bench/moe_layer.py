"""MoE layer latency: eager PyTorch (the zoo module) vs moec's `ort` and `onnx` artifacts.

Configs at a realistic size (hidden 1024): ``mixtral`` (8 experts of 3584, top-2) and
``deepseek`` (64 experts of 512, top-6 in 4 of 8 groups, one shared expert of 1024). For each
T in 1, 16, 512 tokens (input [1, T, 1024], fp32, 2 threads) it first checks each artifact
against eager on that input (relative L2), then reports the median of ``--repeat`` runs after
warm-up, and the ratio to eager measured in the same run.

    python bench/moe_layer.py [--tokens 1 16 512] [--repeat 7] [--json bench/results/moe_layer.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import moec
from moec.models import build_zoo

CONFIGS = {
    "mixtral": dict(hidden=1024, num_experts=8, expert_size=3584, top_k=2),
    "deepseek": dict(
        hidden=1024,
        num_experts=64,
        expert_size=512,
        top_k=6,
        n_group=8,
        topk_group=4,
        shared_size=1024,
    ),
}
TARGETS = ("ort", "onnx")
THREADS = 2


def median_ms(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rel_l2(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def bench_config(name: str, tokens: list[int], repeat: int, workdir: Path) -> list[dict]:
    source = build_zoo(name, **CONFIGS[name])
    model = source.model
    runners = {}
    for target in TARGETS:
        result = moec.compile(
            model,
            source.example_inputs,
            target=target,
            output=workdir / f"{name}-{target}",
            input_names=source.input_names,
            dynamic_shapes=source.dynamic_shapes,
            output_names=source.output_names,
        )
        runners[target] = (moec.load(result.path, intra_op_threads=THREADS), result)
    rows = []
    for t in tokens:
        x = torch.randn(1, t, CONFIGS[name]["hidden"], generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ref = model(x).numpy()
            eager_ms = median_ms(functools.partial(model, x), repeat)
        rows.append(dict(config=name, tokens=t, row="eager (zoo module)", ms=eager_ms, rel_l2=0.0))
        feeds = {"x": x.numpy()}
        for target, (runner, result) in runners.items():
            err = rel_l2(runner(x.numpy()), ref)
            ms = median_ms(functools.partial(runner.infer, feeds), repeat)
            lowering = "/".join(sorted({b.lowering for b in result.blocks}))
            rows.append(
                dict(config=name, tokens=t, row=f"moec {target} ({lowering})", ms=ms, rel_l2=err)
            )
        for row in rows[-1 - len(runners) :]:
            row["vs_eager"] = eager_ms / row["ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 512])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("bench/results/moe_layer.json"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moec-bench-") as workdir:
        for name in args.configs:
            rows += bench_config(name, args.tokens, args.repeat, Path(workdir))
    table = Table(
        "config",
        "T",
        "row",
        "ms (median)",
        "speed-up vs eager",
        "rel L2 vs eager",
        title=f"MoE layer, fp32, {THREADS} threads, median of {args.repeat}",
    )
    for r in rows:
        table.add_row(
            r["config"],
            str(r["tokens"]),
            r["row"],
            f"{r['ms']:.3f}",
            f"{r['vs_eager']:.2f}x",
            f"{r['rel_l2']:.1e}",
        )
    Console(width=120).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": THREADS,
        "repeat": args.repeat,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "configs": CONFIGS,
    }
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
