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

from moec import registry
from moec.errors import ArtifactError
from moec.ir.signature import TensorSpec, require

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "FileEntry", "Manifest", "file_sha256"]

FORMAT = "moec-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


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
    settings: dict[str, Any] = field(default_factory=dict)  # `CompileSettings.to_dict()`
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
        require(isinstance(data, dict), where, "must be a JSON object")
        require(data.get("format") == FORMAT, where, f"'format' must be {FORMAT!r}")
        version = data.get("format_version")
        require(
            version == FORMAT_VERSION,
            where,
            f"format_version {version!r} is not {FORMAT_VERSION}, the one this moec reads; "
            "compile the artifact with this version of moec",
        )
        targets = registry.target_names()
        require(data.get("target") in targets, where, f"'target' must be one of {targets}")
        declared = (*registry.target(data["target"]).files, *registry.SHARED_FILE_ROLES)
        for key, kind in (("source", dict), ("inputs", list), ("outputs", list), ("files", dict)):
            require(isinstance(data.get(key), kind), where, f"needs '{key}' ({kind.__name__})")
        files = {}
        for role, entry in data["files"].items():
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("path"), str)
                and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)
            )
            require(ok, where, f"files.{role} needs path, bytes and sha256")
            require(
                role in declared,
                where,
                f"files.{role}: a {data['target']} artifact has no such file",
            )
            require(
                "/" not in entry["path"] and entry["path"] not in ("", ".", ".."),
                where,
                f"files.{role}.path must be a plain file name",
            )
            files[role] = FileEntry(entry["path"], entry["bytes"], entry["sha256"])
        require("model" in files, where, "files needs a 'model' entry")
        inputs = [
            TensorSpec.from_dict(d, f"{where}: inputs[{i}]") for i, d in enumerate(data["inputs"])
        ]
        outputs = [
            TensorSpec.from_dict(d, f"{where}: outputs[{i}]") for i, d in enumerate(data["outputs"])
        ]
        require(bool(inputs), where, "declares no inputs")
        require(any(o.role == "main" for o in outputs), where, "declares no main output")
        names = [t.name for t in inputs + outputs]
        require(len(names) == len(set(names)), where, "input/output names must be unique")
        optional = {
            "blocks": list,
            "passes": list,
            "tolerances": dict,
            "versions": dict,
            "notes": list,
            "compression": dict,
            "settings": dict,
        }
        for key, kind in optional.items():
            require(
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
            settings=data.get("settings", {}),
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
