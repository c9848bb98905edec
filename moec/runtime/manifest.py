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
from moec.runtime.decoding import Decoding
from moec.runtime.manifest_schema import validate

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "FileEntry", "Manifest", "file_sha256"]

FORMAT = "moec-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


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
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    compression: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # `CompileSettings.to_dict()`
    decoding: dict[str, Any] = field(default_factory=dict)  # the KV cache: `Decoding`
    build: dict[str, Any] = field(default_factory=dict)  # the target's build (TensorRT's engine)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def main_outputs(self) -> list[TensorSpec]:
        return [o for o in self.outputs if o.role == "main"]

    @property
    def model_outputs(self) -> list[TensorSpec]:
        """The model's own outputs: the main ones and its KV cache."""
        return [o for o in self.outputs if o.role in ("main", "cache")]

    @property
    def deployable_bytes(self) -> int:
        """Bytes of the files a runner reads (all but the reference files verify reads)."""
        return sum(
            f.bytes for role, f in self.files.items() if role not in registry.REFERENCE_FILE_ROLES
        )

    @property
    def cache(self) -> Decoding | None:
        return Decoding.from_manifest(self.decoding, self.inputs, self.outputs, MANIFEST_NAME)

    def to_json(self) -> str:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, directory: str | Path, skip_roles: tuple[str, ...] = ()) -> Manifest:
        """Read and validate ``directory/manifest.json`` and the files it names (but those of
        ``skip_roles``, which the caller is about to replace)."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise ArtifactError(f"{directory} is not an artifact directory (no such directory)")
        if not path.is_file():
            raise ArtifactError(
                f"{directory} has no {MANIFEST_NAME}; it is not a moec artifact, or an incomplete "
                "one: compile it again"
            )
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(
                f"{path} is {path.stat().st_size} bytes, more than a manifest ever needs "
                f"({MAX_MANIFEST_BYTES}); it is not one moec wrote"
            )
        try:
            data = json.loads(path.read_text(), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
            raise ArtifactError(
                f"{path} is not valid JSON ({why}); compile the artifact again"
            ) from e
        manifest = cls.from_dict(data, str(path))
        manifest.check_files(directory, skip_roles)
        return manifest

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        """A manifest from its JSON document, validated against `manifest_schema.SCHEMA` and
        the registry (its target, and the files that target writes)."""
        require(isinstance(data, dict), where, "must be a JSON object")
        require(data.get("format") == FORMAT, where, f"'format' must be {FORMAT!r}")
        version = data.get("format_version")
        require(
            version == FORMAT_VERSION,
            where,
            f"format_version {version!r} is not {FORMAT_VERSION}, the one this moec reads; "
            "compile the artifact with this version of moec",
        )
        validate(data, where)
        targets = registry.target_names()
        require(data["target"] in targets, where, f"'target' must be one of {targets}")
        declared = (*registry.target(data["target"]).files, *registry.SHARED_FILE_ROLES)
        files = {}
        for role, entry in data["files"].items():
            kind = data["target"]
            base, _, shard = role.partition(".")  # weights.2, ...: a shard of the weights
            known = role in declared or (base in declared and shard.isdigit())
            require(known, where, f"files.{role}: a {kind} artifact has no such file")
            files[role] = FileEntry(entry["path"], entry["bytes"], entry["sha256"])
        paths = [f.path for f in files.values()]
        require(len(paths) == len(set(paths)), where, "files name one file twice")
        require(MANIFEST_NAME not in paths, where, f"files may not name {MANIFEST_NAME}")
        inputs = [TensorSpec.from_dict(d) for d in data["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in data["outputs"]]
        require(any(o.role == "main" for o in outputs), where, "declares no main output")
        names = [t.name for t in inputs + outputs]
        require(len(names) == len(set(names)), where, "input/output names must be unique")
        for spec in inputs + outputs:
            for dim in spec.shape:
                bounded = isinstance(dim, int) or dim.max is None or dim.max >= dim.min
                require(bounded, where, f"{spec.name}: dim {dim} has max < min")
            low, high = spec.value_range or (0, 1)
            require(low < high, where, f"{spec.name}: value_range [{low}, {high}) is empty")
        Decoding.from_manifest(data.get("decoding", {}), inputs, outputs, where)
        return cls(
            target=data["target"],
            source=data["source"],
            inputs=inputs,
            outputs=outputs,
            files=files,
            blocks=data.get("blocks", []),
            passes=data.get("passes", []),
            versions=data.get("versions", {}),
            notes=data.get("notes", []),
            compression=data.get("compression", {}),
            settings=data.get("settings", {}),
            decoding=data.get("decoding", {}),
            build=data.get("build", {}),
        )

    def unlisted_files(self, directory: Path) -> list[str]:
        """Files in the artifact directory that the manifest does not list (never checked,
        never read by moec)."""
        listed = {f.path for f in self.files.values()} | {MANIFEST_NAME}
        return sorted(p.name for p in Path(directory).iterdir() if p.name not in listed)

    def check_files(self, directory: Path, skip_roles: tuple[str, ...] = ()) -> None:
        """Every listed file (but those of ``skip_roles``) is there as compiled (sizes and
        hashes); a reference file (`registry.REFERENCE_FILE_ROLES`) may be left out."""
        for role, entry in self.files.items():
            if role in skip_roles:
                continue
            path = directory / entry.path
            if role in registry.REFERENCE_FILE_ROLES and not path.exists():
                continue
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
