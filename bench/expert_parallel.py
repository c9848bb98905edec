"""Expert placement and the expert-parallel runtime, measured.

Two models: the byte-level MoE language model of `compression.py` (16 experts, top-2, 4
layers), trained here on Python's documentation for --moe-steps steps (real text, so real
imbalance: its load-balancing loss keeps it mild), and zoo:deepseek-lm on random token ids.
For each, the expert load is the torch artifact's own routing on 1024 rows drawn from the
corpus' training part (fit) and 1024 from its held-out part (random ids for the zoo model),
then:

- max/mean tokens per device on held-out tokens for N = 2, 4, 8, 16 devices: contiguous, eplb
  and hierarchical (nodes of 4 devices), with R = 0 and R = N redundant experts;
- a rebalance from contiguous at N = 8 moving at most a quarter of the experts, and the share of
  the imbalance it recovers of what eplb without replicas removes;
- the simulator's step time per MoE layer for N = 8 to 256 (H100 parameters, not measured);
- the wall time of one call on 2 and 4 gloo ranks (processes on this machine), and on one
  process over 2 CPU "devices", against one process: on 2 cores it is the runtimes' overhead,
  not a speed-up.

Targets: with R = N, max/mean <= 1.05 at N = 8 on held-out tokens; a rebalance that moves at
most a quarter of the experts recovers at least half of the imbalance it targets. Writes
bench/results/expert_parallel.json.

    python bench/expert_parallel.py [--moe-steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import moec
from moec.models import ModelSource
from moec.placement_simulator import GPU_COUNTS, redundant_for, simulate
from moec.placing import expert_load, place
from moec.runtime.placement_policies import contiguous, eplb, hierarchical, moved, rebalance
from moec.timing import cpu_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compression  # noqa: E402  (the trained model of the compression benchmark)

RESULTS = HERE / "results" / "expert_parallel.json"
DEVICES = (2, 4, 8, 16)
FIT_ROWS = 1024
TIMED_RANKS = (2, 4)
console = Console()


def balance(plan, load: np.ndarray) -> float:
    per_device = plan.device_load(load)
    return float(per_device.max() / per_device.mean())


def plans(name: str, fit: np.ndarray, devices: int, redundant: int, groups: int) -> dict:
    nodes = max(1, devices // 4)
    found = {"eplb": eplb(name, fit, devices, redundant)}
    found["hierarchical"] = hierarchical(name, fit, devices, nodes, redundant, groups)
    if redundant == 0:
        found["contiguous"] = contiguous(name, fit, devices)
    return found


def balance_rows(model: str, fit: dict, held: dict, groups: dict) -> list[dict]:
    rows = []
    for devices in DEVICES:
        for redundant in (0, devices):
            for block in fit:
                for policy, plan in plans(
                    block, fit[block], devices, redundant, groups[block]
                ).items():
                    rows.append(
                        {
                            "model": model,
                            "block": block,
                            "devices": devices,
                            "redundant": redundant,
                            "policy": policy,
                            "held_out": balance(plan, held[block]),
                            "fit": balance(plan, fit[block]),
                        }
                    )
    return rows


def rebalance_rows(model: str, fit: dict, held: dict) -> list[dict]:
    rows = []
    for block, load in fit.items():
        base = contiguous(block, load, 8)
        partial = rebalance(base, load, len(load) // 4)
        target = eplb(block, load, 8, 0)
        before, after, best = (balance(p, held[block]) for p in (base, partial, target))
        recovered = (before - after) / (before - best) if before > best else 1.0
        rows.append(
            {
                "model": model,
                "block": block,
                "moved": moved(base, partial),
                "experts": len(load),
                "before": before,
                "after": after,
                "eplb": best,
                "recovered": recovered,
            }
        )
    return rows


def simulate_rows(model: str, fit: dict, blocks: dict) -> list[dict]:
    rows = []
    block = next(iter(fit))
    shape = {k: int(blocks[block][k]) for k in ("hidden", "expert_size", "top_k")}
    for gpus in GPU_COUNTS:
        base = simulate(fit[block], gpus=gpus, policy="contiguous", **shape)
        plan = simulate(
            fit[block], gpus=gpus, policy="eplb", redundant=redundant_for(len(fit[block]), gpus),
            **shape,
        )  # fmt: skip
        rows.append(
            {
                "model": model,
                "block": block,
                "gpus": gpus,
                "contiguous_ms": base.step_s * 1e3,
                "eplb_ms": plan.step_s * 1e3,
                "eplb_balance": plan.balance,
            }
        )
    return rows


def timed_rows(model: str, artifact: Path, rows: np.ndarray, work: Path) -> list[dict]:
    """Median ms of one call on one process; on one process with 2 CPU devices (the
    single-process dispatch); on 2 and 4 gloo ranks."""
    feeds = work / "x.npz"
    np.savez(feeds, input_ids=rows[:4])
    found = [{"model": model, "ranks": 1, "devices": 1, "ms": _time_one(artifact, feeds)}]
    placed = {}
    for ranks in sorted({2, *TIMED_RANKS}):
        placed[ranks] = shutil.copytree(artifact, work / f"art-{ranks}")
        place(placed[ranks], devices=ranks, calib=work / "calib.npy")
    ms = _time_one(placed[2], feeds, devices=["cpu", "cpu"])
    found.append({"model": model, "ranks": 1, "devices": 2, "ms": ms})
    for ranks in TIMED_RANKS:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(ranks)]
        command += [__file__, "--time-rank", str(placed[ranks]), str(feeds)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        ms = float(done.stdout.split()[-1])
        found.append({"model": model, "ranks": ranks, "devices": ranks, "ms": ms})
    return found


def _time_one(artifact: Path, feeds: Path, repeat: int = 9, **options) -> float:
    with np.load(feeds) as data:
        inputs = {k: data[k] for k in data.files}
    with moec.load(artifact, **options) as runner:
        runner.infer(inputs)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            runner.infer(inputs)
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def time_rank(artifact: str, feeds: str) -> None:
    """Under torchrun: every rank times the same calls; rank 0 prints the median ms."""
    from moec.runtime.expert_parallel import distributed_world, init_from_env, leave

    torch.set_num_threads(1)
    init_from_env()
    ms = _time_one(Path(artifact), Path(feeds))
    if distributed_world()[0] == 0:
        print(ms)
    leave()


def trained_model(steps: int, work: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    train_rows, held_rows = compression.corpus()
    model = compression.moe_lm()
    compression.train(model, train_rows, steps, seed=0, what="the MoE")
    source = ModelSource(
        model, (torch.from_numpy(train_rows[:2]),), ["input_ids"],
        input_ranges={"input_ids": (0, 256)},
    )  # fmt: skip
    artifact = moec.compile(source.model, source.example_inputs, target="torch",
                            output=work / "trained", input_names=["input_ids"],
                            input_ranges={"input_ids": (0, 256)}).path  # fmt: skip
    g = np.random.default_rng(1)  # samples of the whole corpus: its head is documentation only
    fit = train_rows[g.permutation(len(train_rows))[:FIT_ROWS]]
    return artifact, fit, held_rows[g.permutation(len(held_rows))[:FIT_ROWS]]


def zoo_model(work: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    artifact = moec.compile("zoo:deepseek-lm", target="torch", output=work / "zoo").path
    rows = np.random.default_rng(2).integers(0, 256, (2 * FIT_ROWS, 64))
    return artifact, rows[: len(rows) // 2], rows[len(rows) // 2 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe-steps", type=int, default=300)
    parser.add_argument("--time-rank", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_rank:
        time_rank(*args.time_rank)
        return
    torch.set_num_threads(compression.THREADS)
    start = time.time()
    results = {"balance": [], "rebalance": [], "simulate": [], "timed": []}
    with tempfile.TemporaryDirectory(prefix="moec-ep-bench-") as tmp:
        for model, build in (
            ("trained MoE LM", lambda w: trained_model(args.moe_steps, w)),
            ("zoo:deepseek-lm", zoo_model),
        ):
            work = Path(tmp) / model.split()[0].replace(":", "-")
            work.mkdir()
            artifact, fit_rows, held_rows = build(work)
            np.save(work / "calib.npy", np.concatenate([fit_rows, held_rows[:32]]))
            fit, held = expert_load(artifact, fit_rows), expert_load(artifact, held_rows)
            blocks = {b["name"]: b for b in moec.load(artifact).manifest.blocks}
            groups = {n: int(b.get("groups") or 1) for n, b in blocks.items()}
            results["balance"] += balance_rows(model, fit, held, groups)
            results["rebalance"] += rebalance_rows(model, fit, held)
            results["simulate"] += simulate_rows(model, fit, blocks)
            results["timed"] += timed_rows(model, artifact, held_rows, work)
    results["targets"] = targets(results)
    results.update(
        command=f"python bench/expert_parallel.py --moe-steps {args.moe_steps}",
        cpu=cpu_model(), seconds=round(time.time() - start, 1),
    )  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    console.print(f"wrote {RESULTS} ({results['seconds']:.0f} s)")


def targets(results: dict) -> list[dict]:
    at8 = [
        r["held_out"]
        for r in results["balance"]
        if r["devices"] == 8 and r["redundant"] == 8 and r["policy"] == "eplb"
    ]
    recovered = [r["recovered"] for r in results["rebalance"]]
    moved_share = [r["moved"] / r["experts"] for r in results["rebalance"]]
    return [
        {
            "target": "with R = N, max/mean <= 1.05 at N = 8 on held-out tokens (eplb)",
            "measured": f"worst block {max(at8):.3f}",
            "met": max(at8) <= 1.05,
        },
        {
            "target": "a rebalance moving <= 1/4 of the experts recovers >= half the imbalance",
            "measured": f"moved <= {max(moved_share):.0%}; worst recovered {min(recovered):.0%}",
            "met": max(moved_share) <= 0.25 and min(recovered) >= 0.5,
        },
    ]


def report(results: dict) -> None:
    table = Table("model", "N", "R", "contiguous", "eplb", "hierarchical",
                  title="max/mean tokens per device on held-out tokens (worst block)")  # fmt: skip
    key = lambda r: (r["model"], r["devices"], r["redundant"])  # noqa: E731
    cells: dict = {}
    for r in results["balance"]:
        cells.setdefault(key(r), {}).setdefault(r["policy"], []).append(r["held_out"])
    for (model, n, redundant), by in cells.items():
        table.add_row(model, str(n), str(redundant),
                      *(f"{max(by[p]):.3f}" if p in by else "-"
                        for p in ("contiguous", "eplb", "hierarchical")))  # fmt: skip
    console.print(table)
    title = "rebalance from contiguous at N = 8, at most a quarter of the experts"
    moves = Table("model", "block", "moved", "before", "after", "eplb", "recovered", title=title)
    for r in results["rebalance"]:
        moves.add_row(r["model"], r["block"], f"{r['moved']}/{r['experts']}", f"{r['before']:.3f}",
                      f"{r['after']:.3f}", f"{r['eplb']:.3f}", f"{r['recovered']:.0%}")  # fmt: skip
    console.print(moves)
    sim = Table("model", "GPUs", "contiguous ms", "eplb ms", "eplb max/mean",
                title="simulated step per MoE layer (H100 parameters)")  # fmt: skip
    for r in results["simulate"]:
        sim.add_row(r["model"], str(r["gpus"]), f"{r['contiguous_ms']:.3f}", f"{r['eplb_ms']:.3f}",
                    f"{r['eplb_balance']:.3f}")  # fmt: skip
    console.print(sim)
    title = f"wall time on this machine ({cpu_model()})"
    timed = Table("model", "processes", "devices", "ms per call", title=title)
    for r in results["timed"]:
        timed.add_row(r["model"], str(r["ranks"]), str(r["devices"]), f"{r['ms']:.2f}")
    console.print(timed)
    marks = Table("target", "measured", "met", title="targets")
    for t in results["targets"]:
        marks.add_row(t["target"], t["measured"], "yes" if t["met"] else "[red]no")
    console.print(marks)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
