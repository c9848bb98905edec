"""The artifact manifest (``manifest.json``): what an artifact holds and how to call it.

Reading validates the whole document and the files it names (present, same size and sha256), so
a runner never starts on an incomplete, edited or corrupt artifact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moec.errors import ArtifactError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "DynamicDim",
    "FileEntry",
    "Manifest",
    "TensorSpec",
    "file_sha256",
]

FORMAT = "moec-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TARGETS = ("ort", "onnx", "trt", "torch")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


@dataclass(frozen=True)
class DynamicDim:
    """A dimension that varies between calls, within [min, max] (max None: unbounded)."""

    name: str
    min: int = 1
    max: int | None = None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype (numpy name), shape (ints and `DynamicDim`s).

    ``role`` is ``main`` for the model's own inputs and outputs and ``routing`` for the
    per-block routing masks; ``block`` names the MoE block a routing output belongs to;
    ``value_range`` is the half-open range [low, high) of valid values of an integer input.
    """

    name: str
    dtype: str
    shape: tuple[int | DynamicDim, ...]
    role: str = "main"
    block: str | None = None
    value_range: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)

    def shape_str(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = [d if isinstance(d, int) else asdict(d) for d in self.shape]
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        _expect(isinstance(data, dict), where, "must be an object")
        _expect(isinstance(data.get("name"), str), where, "needs a string 'name'")
        _expect(data.get("dtype") in DTYPES, where, f"'dtype' must be one of {DTYPES}")
        _expect(isinstance(data.get("shape"), list), where, "needs a list 'shape'")
        shape: list[int | DynamicDim] = []
        for d in data["shape"]:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
                continue
            _expect(isinstance(d, dict) and isinstance(d.get("name"), str), where, f"bad dim {d!r}")
            low, high = d.get("min", 1), d.get("max")
            _expect(isinstance(low, int) and low >= 0, where, f"bad min in dim {d!r}")
            _expect(high is None or (isinstance(high, int) and high >= low), where, f"dim {d!r}")
            shape.append(DynamicDim(d["name"], low, high))
        value_range = data.get("value_range")
        if value_range is not None:
            _expect(
                isinstance(value_range, list) and len(value_range) == 2, where, "bad value_range"
            )
            value_range = (int(value_range[0]), int(value_range[1]))
        role = data.get("role", "main")
        _expect(role in ("main", "routing"), where, f"unknown role {role!r}")
        return cls(data["name"], data["dtype"], tuple(shape), role, data.get("block"), value_range)


@dataclass(frozen=True)
class FileEntry:
    path: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """Everything an artifact declares. ``files`` maps a role (``model``, ...) to its file."""

    target: str
    source: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, FileEntry]
    blocks: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    tolerances: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    compression: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def main_outputs(self) -> list[TensorSpec]:
        return [o for o in self.outputs if o.role == "main"]

    def to_json(self) -> str:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read and validate ``directory/manifest.json`` and the files it names."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise ArtifactError(f"{directory} is not an artifact directory (no such directory)")
        if not path.is_file():
            raise ArtifactError(
                f"{directory} has no {MANIFEST_NAME}; it is not a moec artifact, or an incomplete "
                "one: compile it again"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(
                f"{path} is not valid JSON ({e}); compile the artifact again"
            ) from e
        manifest = cls.from_dict(data, str(path))
        manifest.check_files(directory)
        return manifest

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        _expect(isinstance(data, dict), where, "must be a JSON object")
        _expect(data.get("format") == FORMAT, where, f"'format' must be {FORMAT!r}")
        version = data.get("format_version")
        _expect(
            version == FORMAT_VERSION,
            where,
            f"format_version {version!r} is not {FORMAT_VERSION}, the one this moec reads; "
            "compile the artifact with this version of moec",
        )
        _expect(data.get("target") in TARGETS, where, f"'target' must be one of {TARGETS}")
        for key, kind in (("source", dict), ("inputs", list), ("outputs", list), ("files", dict)):
            _expect(isinstance(data.get(key), kind), where, f"needs '{key}' ({kind.__name__})")
        files = {}
        for role, entry in data["files"].items():
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("path"), str)
                and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)
            )
            _expect(ok, where, f"files.{role} needs path, bytes and sha256")
            _expect(
                "/" not in entry["path"] and entry["path"] not in ("", ".", ".."),
                where,
                f"files.{role}.path must be a plain file name",
            )
            files[role] = FileEntry(entry["path"], entry["bytes"], entry["sha256"])
        _expect("model" in files, where, "files needs a 'model' entry")
        inputs = [
            TensorSpec.from_dict(d, f"{where}: inputs[{i}]") for i, d in enumerate(data["inputs"])
        ]
        outputs = [
            TensorSpec.from_dict(d, f"{where}: outputs[{i}]") for i, d in enumerate(data["outputs"])
        ]
        _expect(bool(inputs), where, "declares no inputs")
        _expect(any(o.role == "main" for o in outputs), where, "declares no main output")
        names = [t.name for t in inputs + outputs]
        _expect(len(names) == len(set(names)), where, "input/output names must be unique")
        optional = {
            "blocks": list,
            "passes": list,
            "tolerances": dict,
            "versions": dict,
            "notes": list,
            "compression": dict,
        }
        for key, kind in optional.items():
            _expect(
                isinstance(data.get(key, kind()), kind), where, f"'{key}' must be a {kind.__name__}"
            )
        return cls(
            target=data["target"],
            source=data["source"],
            inputs=inputs,
            outputs=outputs,
            files=files,
            blocks=data.get("blocks", []),
            passes=data.get("passes", []),
            tolerances=data.get("tolerances", {}),
            versions=data.get("versions", {}),
            notes=data.get("notes", []),
            compression=data.get("compression", {}),
        )

    def check_files(self, directory: Path) -> None:
        for role, entry in self.files.items():
            path = directory / entry.path
            if not path.is_file():
                raise ArtifactError(
                    f"{directory}: the {role} file {entry.path} named in {MANIFEST_NAME} is "
                    "missing; the artifact is incomplete, compile it again"
                )
            size = path.stat().st_size
            if size != entry.bytes or file_sha256(path) != entry.sha256:
                raise ArtifactError(
                    f"{path} does not match {MANIFEST_NAME} (size {size}, expected "
                    f"{entry.bytes}, or a different sha256): it was changed or damaged after "
                    "compilation; compile the artifact again"
                )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise ArtifactError(f"{where}: {what}")
