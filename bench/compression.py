"""What merging, pruning, distilling and quantising an MoE costs in quality, measured on real text.

In this run, on 2 threads: train a byte-level MoE language model (16 SwiGLU experts, top-2, 4
layers; moec's zoo Mixtral layer, with a load-balancing loss) and a dense model with the same
active parameters (one SwiGLU FFN of two experts' width) on the same token budget, on Python's own
reference documentation and standard library source (part of every CPython install: no
download).
Then compress the MoE with moec's lossy passes, calibrated on training text: every merge method
and every prune method at 75% and 50% of the experts kept, distillation to a dense model of
the dense baseline's width, and expert quantisation (`QUANTIZE`: int8 and int4 round-to-nearest,
alone and after hc merging to 75%). Report perplexity on held-out text (every tenth sequence of
the corpus) for each, the targets of issues 5 and 38, the MoE blocks' bytes as stored, and the
ort artifact sizes. Prints a table, writes bench/results/compression.json.

Distillation: a least-squares fit and DISTILL["block_steps"] Adam steps per block on the
block's outputs for 65,536 calibration tokens, then --distill-steps end-to-end steps of
DISTILL["batch_tokens"] tokens against the MoE (KL of next-token distributions, a quarter
cross-entropy on the text itself), every weight trained: under a quarter of the MoE's training
tokens in all. The calibration set is as large as those steps (CALIB_ROWS), so they read each
calibration token about once: with an eighth of it, read eight times over, the same steps kept
8% of the MoE's gain over the dense model instead of 48%.

    python bench/compression.py [--moe-steps 2000] [--distill-steps 1920] [--models DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from rich.table import Table

import moec
from moec.models import ModelSource
from moec.models.zoo import utf8_bytes
from moec.models.zoo_layers import GatedFFN, MixtralMoE
from moec.models.zoo_lm import TinyMoELM
from moec.passes import MergeExpertsPass, PruneExpertsPass, QuantizeExpertsPass
from moec.passes.calibration import CalibrationData
from moec.passes.compress import compress_model
from moec.passes.distill_dense import DistillDensePass, warmup_cosine
from moec.settings import QuantizeOptions

THREADS = 2
HIDDEN, LAYERS, HEADS, SEQ = 128, 4, 4, 128
EXPERTS, TOP_K, EXPERT_SIZE = 16, 2, 128
BATCH = 32
AUX_LOSS = 0.01
CALIB_ROWS = 16384  # training rows the passes calibrate on (2,097,152 tokens)
DISTILL = dict(batch_tokens=1024, lr=6e-3, label_weight=0.25, block_steps=6000)
QUANTIZE = {  # row name -> options; the first int8 and first int4 rows are the pass defaults
    "int8 per row": QuantizeOptions("int8"),
    "int8 block 128": QuantizeOptions("int8", 128),
    "int4 block 32": QuantizeOptions("int4", 32),
    "int4 block 32 symmetric": QuantizeOptions("int4", 32, symmetric=True),
    "int4 block 128": QuantizeOptions("int4", 128),
}
MERGED = "merge hc 75% + "  # prefix of the rows quantised after merging
RESULTS = Path(__file__).parent / "results" / "compression.json"
console = Console()


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) byte sequences [N, SEQ]: Python's reference documentation
    (``pydoc_data.topics``) and the source of the standard library's top-level modules, as this
    interpreter ships them. Every tenth sequence is held out."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    ids = np.asarray(utf8_bytes("\n\n".join(docs + sources)), dtype=np.int64)
    rows = ids[: len(ids) // SEQ * SEQ].reshape(-1, SEQ)
    held = np.arange(len(rows)) % 10 == 9
    return rows[~held], rows[held]


def moe_lm() -> TinyMoELM:
    return TinyMoELM(
        lambda h: MixtralMoE(h, EXPERTS, EXPERT_SIZE, TOP_K), 256, HIDDEN, LAYERS, HEADS, SEQ
    )


def dense_lm() -> TinyMoELM:
    return TinyMoELM(lambda h: GatedFFN(h, TOP_K * EXPERT_SIZE), 256, HIDDEN, LAYERS, HEADS, SEQ)


def train(model: TinyMoELM, data: np.ndarray, steps: int, seed: int, what: str) -> float:
    """AdamW with warm-up and cosine decay; a Switch-style balance loss for MoE routers."""
    torch.manual_seed(seed)
    routers = [m.router for m in model.modules() if isinstance(m, MixtralMoE)]
    logits_seen: list[torch.Tensor] = []
    for router in routers:
        router.register_forward_hook(lambda mod, args, out: logits_seen.append(out))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimiser, steps)
    g = np.random.default_rng(seed)
    model.train()
    start = time.perf_counter()
    for _ in track(range(steps), description=f"training {what}", console=console):
        batch = torch.from_numpy(data[g.integers(0, len(data), BATCH)])
        logits_seen.clear()
        logits = model(batch)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), batch[:, 1:].reshape(-1))
        for router_logits in logits_seen:
            loss = loss + AUX_LOSS * _balance_loss(router_logits)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    return time.perf_counter() - start


def _balance_loss(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.float().softmax(-1).reshape(-1, EXPERTS)
    chosen = probs.topk(TOP_K, dim=-1).indices
    share = torch.zeros(EXPERTS).index_add(0, chosen.reshape(-1), torch.ones(chosen.numel()))
    return EXPERTS * (share / chosen.numel() * probs.mean(0)).sum()


def perplexity(model: torch.nn.Module, data: np.ndarray) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), 64):
            batch = torch.from_numpy(data[start : start + 64])
            logits = model(batch)
            total += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, 256), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def ort_size(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        example = (torch.zeros(1, 16, dtype=torch.long),)
        result = moec.compile(model, example, target="ort", output=Path(tmp) / "a")
        return result.size_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe-steps", type=int, default=2000)
    parser.add_argument("--distill-steps", type=int, default=1920)
    parser.add_argument(
        "--models",
        type=Path,
        help="Keep the trained models here and reuse them on the next run (same settings).",
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    bench_start = time.perf_counter()
    train_rows, held_out = corpus()
    console.print(
        f"corpus: {train_rows.size:,} training and {held_out.size:,} held-out bytes "
        f"(Python docs + stdlib source); sequences of {SEQ}"
    )
    torch.manual_seed(10)  # initial weights: the same on every run
    moe = moe_lm()
    torch.manual_seed(11)
    models = {"moe": moe, "dense": dense_lm()}
    seconds = {}
    for name, model in models.items():
        saved = args.models / f"{name}-{args.moe_steps}.pt" if args.models else None
        if saved is not None and saved.is_file():
            model.load_state_dict(torch.load(saved))
            model.eval()
            seconds[name] = None  # trained by an earlier run
            continue
        seconds[name] = train(model, train_rows, args.moe_steps, 0, f"the {name} model")
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), saved)
    moe, dense = models["moe"], models["dense"]
    train_tokens = args.moe_steps * BATCH * SEQ
    rows = [
        {"model": "MoE (original)", "ppl": perplexity(moe, held_out), "seconds": seconds["moe"]},
        {
            "model": "dense, same active parameters",
            "ppl": perplexity(dense, held_out),
            "seconds": seconds["dense"],
        },
    ]
    base_ppl = rows[0]["ppl"]
    source = ModelSource(
        moe,
        (torch.from_numpy(train_rows[:2]),),
        input_names=["input_ids"],
        input_ranges={"input_ids": (0, 256)},
    )
    calib = train_rows[np.random.default_rng(1).permutation(len(train_rows))[:CALIB_ROWS]]
    calibration = CalibrationData(calib[:-16], calib[-16:], "training text")
    variants = {}
    for keep in (0.75, 0.5):
        for method in ("hc", "router-logits", "random"):
            variants[f"merge {method} {keep:.0%}"] = [MergeExpertsPass(keep, method)]
        variants[f"merge hc+lstsq {keep:.0%}"] = [MergeExpertsPass(keep, "hc", correct=True)]
        for method in ("frequency", "reap", "reconstruction"):
            variants[f"prune {method} {keep:.0%}"] = [PruneExpertsPass(keep, method)]
    variants["distill dense"] = [DistillDensePass(steps=args.distill_steps, **DISTILL)]
    for name, options in QUANTIZE.items():
        variants[name] = [QuantizeExpertsPass(options)]
        variants[MERGED + name] = [MergeExpertsPass(0.75), QuantizeExpertsPass(options)]
    compressed = {}
    for name, passes in variants.items():
        start = time.perf_counter()
        result = compress_model(source, passes, calibration)
        ppl = perplexity(result.source.model, held_out)
        moe_sizes = result.quality["moe_parameters"]
        row = {
            "model": name,
            "ppl": ppl,
            "delta": ppl - base_ppl,
            "increase": ppl / base_ppl - 1,
            "seconds": time.perf_counter() - start,
            "moe_parameters": moe_sizes["after"],
            "moe_bytes": moe_sizes["bytes_after"],  # as stored: int4 codes at half a byte
            "moe_bytes_before": moe_sizes["bytes_before"],
        }
        if name == "distill dense":
            # the calibration tokens (run through the model once per layer fitted) plus the
            # tokens of the optimiser steps
            report = result.records[0]["report"]
            row["distill_tokens"] = report["blocks"][0]["fit_tokens"] + report["train_tokens"]
        rows.append(row)
        compressed[name] = result.source.model
    sized = ["merge hc 50%", "distill dense", *QUANTIZE, MERGED + "int4 block 32"]
    sizes = {"MoE (original)": ort_size(moe)} | {n: ort_size(compressed[n]) for n in sized}
    by = {r["model"]: r for r in rows}
    targets = _targets(by, train_tokens) + _quantize_targets(by, sizes)
    _print(rows, sizes, targets, train_tokens)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "config": {
                    "hidden": HIDDEN,
                    "layers": LAYERS,
                    "experts": EXPERTS,
                    "top_k": TOP_K,
                    "expert_size": EXPERT_SIZE,
                    "seq": SEQ,
                    "batch": BATCH,
                    "moe_steps": args.moe_steps,
                    "train_tokens": train_tokens,
                    "distill_steps": args.distill_steps,
                    "distill": DISTILL,
                    "threads": THREADS,
                },
                "rows": rows,
                "ort_bytes": sizes,
                "targets": targets,
                "seconds": time.perf_counter() - bench_start,
            },
            indent=2,
        )
    )
    console.print(f"wrote {RESULTS} ({time.perf_counter() - bench_start:.0f} s in all)")


def _targets(by: dict, train_tokens: int) -> list[dict]:
    def delta(name: str) -> float:
        return by[name]["delta"]

    best50 = min((r for r in by.values() if r["model"].endswith(" 50%")), key=lambda r: r["delta"])
    moe, dense, distilled = (
        by["MoE (original)"]["ppl"],
        by["dense, same active parameters"]["ppl"],
        by["distill dense"]["ppl"],
    )
    gain = (dense - distilled) / (dense - moe) if dense > moe else float("nan")
    budget = by["distill dense"]["distill_tokens"] / train_tokens
    return [
        {
            "issue": 5,
            "target": "75%: hc raises ppl < half as much as random merging",
            "measured": f"{delta('merge hc 75%'):+.3f} vs {delta('merge random 75%'):+.3f}",
            "met": delta("merge hc 75%") < 0.5 * delta("merge random 75%"),
        },
        {
            "issue": 5,
            "target": "75%: hc raises ppl less than frequency pruning",
            "measured": f"{delta('merge hc 75%'):+.3f} vs {delta('prune frequency 75%'):+.3f}",
            "met": delta("merge hc 75%") < delta("prune frequency 75%"),
        },
        {
            "issue": 5,
            "target": "50%: the best method raises ppl < half as much as random merging",
            "measured": f"{best50['model']} {best50['delta']:+.3f} vs "
            f"{delta('merge random 50%'):+.3f}",
            "met": best50["delta"] < 0.5 * delta("merge random 50%"),
        },
        {
            "issue": 5,
            "target": "distilled dense keeps >= 30% of the MoE's gain, budget <= 25% of tokens",
            "measured": f"gain kept {gain:.1%} (dense {dense:.3f}, distilled {distilled:.3f}, "
            f"MoE {moe:.3f}); budget {budget:.1%}",
            "met": bool(dense > moe and gain >= 0.3 and budget <= 0.25),
        },
    ]


def _quantize_targets(by: dict, sizes: dict) -> list[dict]:
    """Issue 38: quality on the trained model, and the ort artifact against fp32's. The artifact
    holds the non-expert weights too (embeddings, attention) at fp32; the MoE blocks' own ratio
    (bytes as stored) is given beside it."""
    fp32 = sizes["MoE (original)"]
    out = []
    for name, limit in (("int8 per row", 0.005), ("int4 block 32", 0.04)):
        rise = by[name]["increase"]
        out.append(
            {
                "issue": 38,
                "target": f"{name}: held-out ppl rises <= {limit:.1%}",
                "measured": f"{rise:+.2%} ({by[name]['ppl']:.3f} vs "
                f"{by['MoE (original)']['ppl']:.3f})",
                "met": rise <= limit,
            }
        )
    for name, limit in (("int8 per row", 0.55), ("int4 block 32", 0.3)):
        ratio = sizes[name] / fp32
        moe = by[name]["moe_bytes"] / by[name]["moe_bytes_before"]
        out.append(
            {
                "issue": 38,
                "target": f"{name}: ort artifact <= {limit}x fp32's",
                "measured": f"artifact {ratio:.3f}x ({sizes[name]:,} vs {fp32:,} B); "
                f"MoE blocks {moe:.3f}x",
                "met": ratio <= limit,
            }
        )
    return out


def _print(rows, sizes, targets, train_tokens) -> None:
    table = Table(
        "model", "held-out ppl", "change", "MoE params", "MoE bytes", "seconds", title="quality"
    )
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['ppl']:.3f}",
            f"{r['delta']:+.3f} ({r['increase']:+.2%})" if "delta" in r else "",
            f"{r['moe_parameters']:,}" if "moe_parameters" in r else "",
            f"{r['moe_bytes']:,}" if "moe_bytes" in r else "",
            "loaded" if r["seconds"] is None else f"{r['seconds']:.1f}",
        )
    console.print(table)
    console.print(
        "ort artifact: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sizes.items())
    )
    console.print(f"training tokens per model: {train_tokens:,}")
    marks = Table("issue", "target", "measured", "met", title="targets")
    for t in targets:
        met = "[green]yes" if t["met"] else "[red]no"
        marks.add_row(str(t["issue"]), t["target"], t["measured"], met)
    console.print(marks)


if __name__ == "__main__":
    main()
