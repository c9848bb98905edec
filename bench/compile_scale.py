"""Compiling models bigger than memory: peak RSS and wall time of `moec compile`, `moec verify`
and `moec.load` + one call, against the weights' size.

Two transformers checkpoints at realistic layer sizes (hidden 1024, vocab 32000, random
weights, fp32), at 1, 2, 4 and 8 layers: Mixtral-like (8 experts of 3584, top-2) and
DeepSeek-like (64 routed experts of 512, top-6, one shared expert, MLA attention). Each command
runs in its own process; its peak RSS is the kernel's (``wait4``'s ``ru_maxrss``). Targets:
compile and verify peak RSS <= 1 GB + the largest block's weights, flat in the layer count
(RAM added per byte of weights added); compile time linear in the weights (the slope, GB/s);
`moec.load` + one call at about one copy of the weights.

    python bench/compile_scale.py [--models mixtral-like deepseek-like] [--layers 1 2 4 8]
        [--no-verify] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
GB = 1e9
TARGET_BASE = 1 * GB  # compile and verify may use this much besides the largest block
FLAT = 0.1  # bytes of RAM a byte of weights added may add, to count as flat
LOAD_COPIES = 1.3  # `moec.load` + one call: about one copy of the weights
COMMON = dict(
    vocab_size=32000,
    hidden_size=1024,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
MAKE = """
import sys, torch, transformers
torch.manual_seed(0)
name, layers, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
common = {common!r}
if name == "mixtral-like":
    config = transformers.MixtralConfig(**common, num_hidden_layers=layers,
        intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2)
    cls = transformers.MixtralForCausalLM
else:
    common["num_key_value_heads"] = common["num_attention_heads"]  # MLA: one per head
    config = transformers.DeepseekV3Config(**common, num_hidden_layers=layers,
        intermediate_size=2816, moe_intermediate_size=512, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=1, n_group=8, topk_group=4,
        first_k_dense_replace=0, q_lora_rank=512, kv_lora_rank=256)
    cls = transformers.DeepseekV3ForCausalLM
with torch.device("cpu"):
    model = cls(config)
model.save_pretrained(out)
"""
LOAD_AND_CALL = """
import sys, numpy as np, moec
m = moec.load(sys.argv[1])
m(np.random.default_rng(0).integers(0, 32000, (1, 16)))
"""
MODELS = ("mixtral-like", "deepseek-like")


def run(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, output) of one command in its own process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{output[-3000:]}")
    return wall, usage.ru_maxrss * 1024, output


def checkpoint_bytes(directory: Path) -> tuple[int, int]:
    """(all weights, the largest block's: one decoder layer, or the embedding or the head)."""
    from safetensors import safe_open

    groups: dict[str, int] = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open is not a dict)
                piece = f.get_slice(key)
                size = int(np.prod(piece.get_shape())) * (2 if "16" in piece.get_dtype() else 4)
                layer = re.match(r"(model\.layers\.\d+)\.", key)
                group = layer.group(1) if layer else key
                groups[group] = groups.get(group, 0) + size
    return sum(groups.values()), max(groups.values())


def measure(name: str, layers: int, workdir: Path, verify: bool) -> dict:
    source = workdir / f"{name}-{layers}"
    if not source.exists():
        make = MAKE.format(common=COMMON)
        subprocess.run([sys.executable, "-c", make, name, str(layers), str(source)], check=True)
    weights, largest = checkpoint_bytes(source)
    out = workdir / f"{name}-{layers}.out"
    moec = [sys.executable, "-m", "moec"]
    row = {"model": name, "layers": layers, "weights": weights, "largest_block": largest}
    wall, peak, _ = run([*moec, "compile", f"hf:{source}", "--target", "ort", "-o", str(out),
                         "--force"])  # fmt: skip
    row.update(compile_s=wall, compile_rss=peak)
    row["artifact"] = sum(f.stat().st_size for f in out.iterdir())
    if verify:
        wall, peak, text = run([*moec, "verify", str(out), "--by-layers"])
        row.update(verify_s=wall, verify_rss=peak, verify_passed="PASS" in text)
    wall, peak, _ = run([sys.executable, "-c", LOAD_AND_CALL, str(out)])
    row.update(load_s=wall, load_rss=peak)
    return row


def judge(rows: list[dict]) -> dict:
    """Per model: the targets, met or not, with the figures that decide them."""
    verdicts = {}
    for name in sorted({r["model"] for r in rows}):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["weights"])
        w = np.array([r["weights"] for r in mine], dtype=float)
        verdict: dict = {}
        for step in ("compile", "verify"):
            if f"{step}_rss" not in mine[0]:
                continue
            rss = np.array([r[f"{step}_rss"] for r in mine], dtype=float)
            cap = [TARGET_BASE + r["largest_block"] for r in mine]
            slope = float(np.polyfit(w, rss, 1)[0]) if len(mine) > 1 else float("nan")
            verdict[step] = {
                "under_cap": bool(all(rss <= cap)),
                "rss_per_weight_byte": slope,
                "flat": bool(slope <= FLAT) if len(mine) > 1 else None,
            }
        if len(mine) > 1:
            seconds = np.array([r["compile_s"] for r in mine])
            fit = np.polyfit(w / GB, seconds, 1)
            verdict["compile_gb_per_s"] = float(1 / fit[0]) if fit[0] > 0 else float("inf")
            residual = seconds - np.polyval(fit, w / GB)
            verdict["compile_time_fit_max_residual_s"] = float(np.abs(residual).max())
        verdict["load_copies"] = max(r["load_rss"] / r["weights"] for r in mine)
        verdict["load_about_one_copy"] = bool(verdict["load_copies"] <= LOAD_COPIES)
        verdicts[name] = verdict
    return verdicts


def table(rows: list[dict]) -> Table:
    t = Table(title="compile, verify and load at scale (peak RSS, wall)")
    for col in ("model", "layers", "weights", "largest block", "compile RSS", "compile s",
                "cap", "verify RSS", "verify s", "load+call RSS"):  # fmt: skip
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        cap = TARGET_BASE + r["largest_block"]
        t.add_row(
            r["model"],
            str(r["layers"]),
            f"{r['weights'] / GB:.2f} GB",
            f"{r['largest_block'] / GB:.2f} GB",
            f"{r['compile_rss'] / GB:.2f} GB",
            f"{r['compile_s']:.0f}",
            f"{cap / GB:.2f} GB",
            f"{r['verify_rss'] / GB:.2f} GB" if "verify_rss" in r else "-",
            f"{r['verify_s']:.0f}" if "verify_s" in r else "-",
            f"{r['load_rss'] / GB:.2f} GB",
        )
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, marker in zip(MODELS, "os", strict=True):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["weights"])
        if not mine:
            continue
        w = [r["weights"] / GB for r in mine]
        for step, style in (("compile", "-"), ("verify", "--"), ("load", ":")):
            if f"{step}_rss" in mine[0]:
                rss = [r[f"{step}_rss"] / GB for r in mine]
                ax.plot(w, rss, style, marker=marker, label=f"{name} {step}")
        cap = [(TARGET_BASE + r["largest_block"]) / GB for r in mine]
        ax.plot(w, cap, color="grey", linewidth=0.8, marker=marker, label=f"{name} target cap")
    top = max(r["weights"] for r in rows) / GB
    ax.plot([0, top], [0, top], color="black", linewidth=0.5, label="one copy of the weights")
    ax.set_xlabel("weights (GB)")
    ax.set_ylabel("peak RSS (GB)")
    ax.legend(fontsize=7)
    ax.set_title("moec at scale: peak memory against the weights' size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="moec-scale-"))
    rows = []
    for name in args.models:
        for layers in args.layers:
            rows.append(measure(name, layers, workdir, not args.no_verify))
            Console(width=160).print(table(rows[-1:]))
    from moec.timing import cpu_model

    command = "python bench/compile_scale.py " + " ".join(sys.argv[1:])
    for row in rows:
        row["command"] = command
    path = RESULTS / "compile_scale.json"
    if path.exists():  # the other models' rows of an earlier run stay
        earlier = json.loads(path.read_text())
        rows = [r for r in earlier["rows"] if r["model"] not in args.models] + rows
    report = {
        "commands": sorted({r.get("command", "?") for r in rows}),
        "host": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "rows": rows,
        "targets": judge(rows),
    }
    Console(width=160).print(table(rows))
    Console().print_json(json.dumps(report["targets"]))
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, RESULTS / "compile_scale.png")


if __name__ == "__main__":
    main()
