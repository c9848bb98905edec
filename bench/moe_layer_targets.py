"""Issue 4's targets, checked on the rows of `moe_layer.py`, for each target's default lowering.

- faster than every row users run today (eager transformers, its eager loop, torch.compile,
  ONNX Runtime on the plain export) at every T;
- at T >= 512, within 1.3x (config A) or 2.0x (config B) of the compute floor;
- at T <= 16, within 1.3x of the memory floor (beside it, the ratio of the GEMMs alone, and
  for the torch target how its run splits between its GEMMs and its other ops, in place);
- peak memory under 1.5x the layer's weights plus activations.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

COMPUTE_LIMIT = {"A": 1.3, "B": 2.0}
MEMORY_LIMIT = 1.3
PEAK_LIMIT = 1.5
LARGE_T, SMALL_T = 512, 16


def check_targets(rows: list[dict]) -> list[dict]:
    """One entry per (config, default row, target): what was measured and whether it is met."""
    timed = [r for r in rows if "ms" in r]
    checks = []
    for config in sorted({r["config"] for r in timed}):
        mine = [r for r in timed if r["config"] == config]
        for label in dict.fromkeys(r["row"] for r in mine if r["row"].endswith(" *")):
            default = {r["tokens"]: r for r in mine if r["row"] == label}
            checks += _faster(config, label, default, mine)
            checks += _floor(config, label, default, "compute", COMPUTE_LIMIT[config])
            checks += _floor(config, label, default, "memory", MEMORY_LIMIT)
            worst = max(default.values(), key=lambda r: r["peak_ratio"])
            checks.append(
                _check(
                    config,
                    label,
                    f"peak memory < {PEAK_LIMIT}x",
                    f"max {worst['peak_ratio']:.2f} (T={worst['tokens']})",
                    worst["peak_ratio"] < PEAK_LIMIT,
                )
            )
    return checks


def _check(config, label, target, measured, met) -> dict:
    return dict(config=config, row=label, target=target, measured=measured, met=bool(met))


def _faster(config, label, default, rows) -> list[dict]:
    losses = []
    for t, mine in sorted(default.items()):
        users = [r for r in rows if r["tokens"] == t and not r["row"].startswith("moec")]
        best = min(users, key=lambda r: r["ms"])
        if mine["ms"] >= best["ms"]:
            losses.append(f"T={t}: {mine['ms']:.2f} vs {best['row']} {best['ms']:.2f}")
    measured = "; ".join(losses) or "at every T"
    return [_check(config, label, "faster than every baseline", measured, not losses)]


def _floor(config, label, default, kind, limit) -> list[dict]:
    sizes = [t for t in default if (t >= LARGE_T if kind == "compute" else t <= SMALL_T)]
    if not sizes:
        return []
    ratios = {t: default[t][f"vs_{kind}_floor"] for t in sorted(sizes)}
    measured = ", ".join(f"T={t}: {v:.2f}" for t, v in ratios.items())
    if kind == "memory":  # how far the matrix products alone already are from it

        def of_floor(gemm_ms) -> str:
            return ", ".join(
                f"{gemm_ms(default[t]) / default[t]['memory_floor_ms']:.2f}" for t in ratios
            )

        measured += f" (the GEMMs alone: {of_floor(lambda r: r['gemm_floor_ms'])}"
        if label.startswith("moec torch"):  # on the torch target's own GEMM kernel
            onednn = of_floor(lambda r: r["gemm_kernels_ms"]["onednn packed"])
            measured += f"; on oneDNN, the torch target's kernel: {onednn}"
        measured += ")"
        if all("in_place" in default[t] for t in ratios):
            measured += "; in place: " + ", ".join(_in_place(default[t]) for t in ratios)
    met = all(v <= limit for v in ratios.values())
    return [_check(config, label, f"<= {limit}x the {kind} floor", measured, met)]


def _in_place(row: dict) -> str:
    """The torch target's run, profiled in place: its GEMMs and the rest (its other ops and the
    Python between them), both over the memory floor."""
    split, floor = row["in_place"], row["memory_floor_ms"]
    return (
        f"GEMMs {split['gemm_ms'] / floor:.2f} + {split['other_ops']} other ops "
        f"{split['other_ms'] / floor:.2f}"
    )


def print_targets(checks: list[dict]) -> None:
    table = Table("cfg", "default row", "target", "measured", "met", title="issue 4 targets")
    for c in checks:
        mark = "[green]yes" if c["met"] else "[red]no"
        table.add_row(c["config"], c["row"], c["target"], c["measured"], mark)
    Console(width=160).print(table)
