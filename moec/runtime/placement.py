"""`Placement`: where each MoE block's experts live when an artifact runs over several devices
(``placement.json`` in the artifact, written by ``moec place``).

Per block, ``slots[d]`` lists the logical experts device ``d`` holds, one per physical slot; an
expert held on several devices has replicas, and a token's pairs for it are spread over them.
A placement names the artifact's model file by its sha256, so it is never applied to another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from moec.errors import ArtifactError

__all__ = ["PLACEMENT_FILE", "BlockPlacement", "Placement"]

PLACEMENT_FILE = "placement.json"
FORMAT = "moec-placement"
POLICIES = ("contiguous", "eplb", "hierarchical")
SCHEMA = {
    "type": "object",
    "required": ["format", "devices", "nodes", "policy", "model_sha256", "blocks"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT},
        "devices": {"type": "integer", "minimum": 1, "maximum": 65536},
        "nodes": {"type": "integer", "minimum": 1, "maximum": 65536},
        "policy": {"enum": list(POLICIES)},
        "model_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "blocks": {
            "type": "array",
            "maxItems": 10000,
            "items": {
                "type": "object",
                "required": ["block", "experts", "slots"],
                "additionalProperties": False,
                "properties": {
                    "block": {"type": "string", "maxLength": 1024},
                    "experts": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
                    "slots": {
                        "type": "array",
                        "maxItems": 65536,
                        "items": {
                            "type": "array",
                            "maxItems": 1 << 20,
                            "items": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
        },
        "load": {"type": "object"},
    },
}


@dataclass(frozen=True)
class BlockPlacement:
    """One block's experts over the devices: ``slots[d]`` = logical experts on device ``d``."""

    block: str
    experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        held = {e for device in self.slots for e in device}
        if held != set(range(self.experts)):
            missing = sorted(set(range(self.experts)) - held)
            raise ArtifactError(
                f"placement of block {self.block or '(model)'}: every one of its {self.experts} "
                f"experts needs a slot (missing {missing[:8]}, or ids out of range)"
            )

    @property
    def devices(self) -> int:
        return len(self.slots)

    @property
    def replicas(self) -> np.ndarray:
        """[E] how many devices hold each expert."""
        return np.bincount([e for d in self.slots for e in d], minlength=self.experts)

    def holders(self, expert: int) -> list[tuple[int, int]]:
        """(device, slot) of every replica of ``expert``."""
        return [
            (d, s)
            for d, device in enumerate(self.slots)
            for s, e in enumerate(device)
            if e == expert
        ]

    def device_load(self, load: np.ndarray) -> np.ndarray:
        """[devices] tokens each device serves when every expert's tokens ``load`` [E] are spread
        evenly over its replicas."""
        share = np.asarray(load, dtype=np.float64) / self.replicas
        return np.array([sum(share[e] for e in device) for device in self.slots])


@dataclass
class Placement:
    """Every block's `BlockPlacement`, for one artifact (``model_sha256``) and ``devices``
    devices on ``nodes`` nodes, made by ``policy``; ``load``: the expert load it was planned
    on, per block (``fit``, ``held_out``: tokens per expert)."""

    devices: int
    nodes: int
    policy: str
    model_sha256: str
    blocks: list[BlockPlacement]
    load: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def block(self, name: str) -> BlockPlacement:
        for placed in self.blocks:
            if placed.block == name:
                return placed
        raise ArtifactError(f"the placement has no block {name!r}; place the artifact again")

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "devices": self.devices,
            "nodes": self.nodes,
            "policy": self.policy,
            "model_sha256": self.model_sha256,
            "blocks": [
                {"block": b.block, "experts": b.experts, "slots": [list(d) for d in b.slots]}
                for b in self.blocks
            ],
            "load": self.load,
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> Placement:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise ArtifactError(f"{path} is not a readable placement ({e})") from e
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(SCHEMA).iter_errors(data)
        )
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "the placement"
            raise ArtifactError(f"{path}: {where}: {error.message[:200]}")
        blocks = [
            BlockPlacement(b["block"], b["experts"], tuple(tuple(d) for d in b["slots"]))
            for b in data["blocks"]
        ]
        for placed in blocks:
            if placed.devices != data["devices"]:
                raise ArtifactError(
                    f"{path}: block {placed.block} is placed on {placed.devices} devices, the "
                    f"placement on {data['devices']}"
                )
        return cls(
            data["devices"],
            data["nodes"],
            data["policy"],
            data["model_sha256"],
            blocks,
            data.get("load", {}),
        )

    def check_artifact(self, blocks: dict[str, int], model_sha256: str) -> None:
        """Raise unless this placement is for an artifact of ``blocks`` (name -> experts) whose
        model file has ``model_sha256``."""
        if model_sha256 != self.model_sha256:
            raise ArtifactError(
                "the placement was made for another artifact (its model's sha256 differs); "
                "run moec place on this one"
            )
        placed = {b.block: b.experts for b in self.blocks}
        if placed != blocks:
            raise ArtifactError(
                f"the placement covers blocks {placed}, the artifact has {blocks}; run moec "
                "place again"
            )

    def describe(self) -> dict[str, Any]:
        return {"devices": self.devices, "nodes": self.nodes, "policy": self.policy}
