"""``moec place OUT``: measure an artifact's expert load on calibration data, plan where each
block's experts live over N devices, and write the plan into the artifact (``placement.json``,
listed in the manifest, the artifact replaced atomically).

The load is the artifact's own: it runs the calibration rows and counts its routing outputs,
so it is what the artifact will route, on any target. The plan is made on the fitting rows and
judged on the held-out ones.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moec import registry
from moec.compiler.artifact_writer import claim, write_artifact
from moec.errors import CalibrationError, SettingsError
from moec.passes.calibration import HELD_OUT_FRACTION
from moec.runtime.load import load
from moec.runtime.manifest import Manifest
from moec.runtime.placement import PLACEMENT_FILE, BlockPlacement, Placement
from moec.runtime.placement_policies import contiguous, eplb, hierarchical, moved, rebalance

__all__ = ["BATCH_ROWS", "PlacementReport", "expert_load", "place"]

BATCH_ROWS = 8


@dataclass
class BlockReport:
    block: str
    experts: int
    replicas: int  # beyond one per expert
    baseline: float  # max/mean tokens per device, contiguous, on held-out tokens
    planned: float  # the same for the plan
    moves: int = 0  # expert replicas moved from the placement the artifact had


@dataclass
class PlacementReport:
    placement: Placement
    blocks: list[BlockReport]
    expert_bytes: dict[str, int]  # per block, bytes of one expert's weights
    slots: int = 0  # physical expert slots per device (the largest block's)
    notes: list[str] = field(default_factory=list)

    @property
    def overall(self) -> tuple[float, float]:
        """(contiguous, plan) max/mean over all blocks' summed device loads, held out."""
        base = [b.baseline for b in self.blocks]
        plan = [b.planned for b in self.blocks]
        return (float(np.mean(base)), float(np.mean(plan))) if base else (1.0, 1.0)


def calibration_rows(path: Path, manifest: Manifest, samples: int | None) -> tuple:
    """(fit, held_out) rows of the artifact's first input, from a .npy file."""
    path = Path(path)
    if path.suffix != ".npy" or not path.is_file():
        raise CalibrationError(
            f"--calib {path}: moec place reads a .npy of the artifact's first input "
            f"({manifest.inputs[0].name}, rows of {manifest.inputs[0].shape_str()})"
        )
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CalibrationError(f"--calib {path}: not a readable .npy file ({e})") from e
    rows = rows[:samples] if samples else rows
    if len(rows) < 2:
        raise CalibrationError(f"--calib {path}: {len(rows)} row(s); need >= 2 (fit + held out)")
    held = max(1, round(len(rows) * HELD_OUT_FRACTION))
    return rows[:-held], rows[-held:]


def expert_load(path: Path, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per block, (token, expert) pairs routed to each expert by the artifact at ``path``."""
    manifest = Manifest.read(path)
    routing = [o for o in manifest.outputs if o.role == "routing"]
    if not routing:
        raise CalibrationError(
            f"{path} has no routing outputs to count expert load from (compiled with "
            "--no-routing-outputs); compile it again without that flag to place its experts"
        )
    counts = {o.block: np.zeros(o.shape[-1], dtype=np.int64) for o in routing}
    with load(path) as runner:
        for start in range(0, len(rows), BATCH_ROWS):
            outputs = runner.infer(_feeds(manifest, rows[start : start + BATCH_ROWS]))
            for o in routing:
                chosen = np.asarray(outputs[o.name])
                counts[o.block] += chosen.reshape(-1, chosen.shape[-1]).sum(0)
    return counts


def place(
    path: str | Path,
    *,
    devices: int,
    calib: str | Path,
    nodes: int = 1,
    redundant: int = 0,
    policy: str = "eplb",
    calib_samples: int | None = None,
    max_moves: int | None = None,
) -> PlacementReport:
    """Plan the artifact at ``path`` over ``devices`` devices and write the plan into it."""
    path = Path(path)
    if devices < 1 or nodes < 1 or devices % nodes:
        raise SettingsError(f"--devices {devices} must be a positive multiple of --nodes {nodes}")
    manifest = Manifest.read(path)
    if not registry.target(manifest.target).placement:
        runs = [n for n in registry.target_names() if registry.target(n).placement]
        raise SettingsError(
            f"{path} is a {manifest.target!r} artifact, whose runtime does not place experts "
            f"over devices; compile for a target that does ({', '.join(runs)})"
        )
    fit, held_out = calibration_rows(Path(calib), manifest, calib_samples)
    fit_load, held_load = expert_load(path, fit), expert_load(path, held_out)
    current = _current(path, manifest)
    groups = {b["name"]: b.get("groups", 1) for b in manifest.blocks}
    blocks, reports = [], []
    for name, load_fit in fit_load.items():
        if devices > len(load_fit) + redundant:
            raise SettingsError(
                f"--devices {devices}: block {name} has {len(load_fit)} experts and "
                f"--redundant {redundant}, too few to give every device one"
            )
        base = contiguous(name, load_fit, devices)
        if max_moves is not None:
            start = current.block(name) if current else base
            plan = rebalance(start, load_fit, max_moves)
        elif policy == "contiguous":
            if redundant:
                raise SettingsError("--policy contiguous makes no replicas: drop --redundant")
            plan = base
        elif policy == "hierarchical":
            plan = hierarchical(name, load_fit, devices, nodes, redundant, groups.get(name, 1))
        else:
            plan = eplb(name, load_fit, devices, redundant)
        blocks.append(plan)
        held = held_load[name]
        moves = moved(current.block(name), plan) if current and max_moves is not None else 0
        reports.append(
            BlockReport(
                name,
                len(load_fit),
                int(plan.replicas.sum()) - len(load_fit),
                _balance(base, held),
                _balance(plan, held),
                moves,
            )
        )
    placement = Placement(
        devices,
        nodes,
        policy if max_moves is None else "eplb",
        manifest.files["model"].sha256,
        blocks,
        {n: {"fit": fit_load[n].tolist(), "held_out": held_load[n].tolist()} for n in fit_load},
    )
    _write(path, manifest, placement)
    sizes = _expert_bytes(manifest)
    slots = max((max(len(d) for d in b.slots) for b in blocks), default=0)
    return PlacementReport(placement, reports, sizes, slots)


def _balance(plan: BlockPlacement, load: np.ndarray) -> float:
    per_device = plan.device_load(load)
    mean = per_device.mean()
    return float(per_device.max() / mean) if mean > 0 else 1.0


def _current(path: Path, manifest: Manifest) -> Placement | None:
    entry = manifest.files.get("placement")
    return None if entry is None else Placement.read(path / entry.path)


def _feeds(manifest: Manifest, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The artifact's inputs for a batch of first-input rows: an input of one valid value
    (an attention mask) filled with it, decoder ids equal to the ids; the runner fills a
    cache artifact's mask, positions and (empty) past."""
    first = manifest.inputs[0]
    feeds = {first.name: np.ascontiguousarray(rows)}
    cache = manifest.cache
    filled = set() if cache is None else {cache.mask, cache.positions, *cache.past_names}
    for spec in manifest.inputs[1:]:
        if spec.name in filled or spec.role == "mask":  # the runner attends every token
            continue
        low_high = spec.value_range
        if low_high is not None and low_high[1] - low_high[0] == 1:
            feeds[spec.name] = np.full(rows.shape[:2], low_high[0], dtype=spec.dtype)
        elif spec.name == "decoder_input_ids":
            feeds[spec.name] = feeds[first.name]
        else:
            raise CalibrationError(
                f"calibration data gives the artifact's first input only; moec cannot fill in "
                f"input {spec.name!r}"
            )
    return feeds


def _write(path: Path, manifest: Manifest, placement: Placement) -> None:
    """The artifact again, with ``placement.json``: its files linked, not copied, into the
    new directory, which then takes OUT's place in one step."""
    with claim(path, force=True) as held:

        def files(directory: Path) -> dict[str, str]:
            roles = {}
            for role, entry in manifest.files.items():
                if role in registry.REFERENCE_FILE_ROLES and not (path / entry.path).exists():
                    continue  # left out of a deployment
                if role != "placement":
                    _link_or_copy(path / entry.path, directory / entry.path)
                    roles[role] = entry.path
            (directory / PLACEMENT_FILE).write_text(placement.to_json())
            roles["placement"] = PLACEMENT_FILE
            return roles

        write_artifact(held, manifest, files, force=True)


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)


def _expert_bytes(manifest: Manifest) -> dict[str, int]:
    """Per block, bytes of one expert's weights (from the shapes in the manifest's blocks)."""
    return {b["name"]: int(b.get("expert_bytes", 0)) for b in manifest.blocks}
