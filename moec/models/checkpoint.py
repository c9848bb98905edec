"""A ``save_pretrained`` directory's safetensors files, known by their headers: which tensor
lies where, with what dtype and shape. Missing shards, truncated files and tensors whose bytes
do not fit their shape are refused before anything reads them; `read_stored` reads one tensor
(without mapping the whole file)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moec.errors import SourceError

__all__ = [
    "Checkpoint",
    "StoredTensor",
    "has_safetensors",
    "read_stored",
]

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class StoredTensor:
    """Where a checkpoint tensor lies: its file, key, dtype and shape (from the file header)."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its bytes in the file


class Checkpoint:
    """The safetensors files of a ``save_pretrained`` directory, read by header only until a
    tensor is materialised. Missing shards and files shorter than their header says are
    refused here, naming the file and a tensor it should hold."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.tensors: dict[str, StoredTensor] = {}
        for file, keys in self._files().items():
            header = _read_header(file, keys)
            for key in keys if keys is not None else header:
                if key not in header:
                    raise SourceError(
                        f"hf:{directory}: {INDEX_FILE} puts tensor {key} in {file.name}, which "
                        "does not hold it; the checkpoint is incomplete: download it again"
                    )
                self.tensors[key] = header[key]

    def __deepcopy__(self, memo) -> Checkpoint:
        return self  # a model copied (to cast it) shares its checkpoint

    def _files(self) -> dict[Path, list[str] | None]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SourceError(f"hf:{self.directory}: {INDEX_FILE} is not valid ({e})") from e
            files: dict[Path, list[str] | None] = {}
            for key, name in weight_map.items():
                path = self.directory / name
                if not path.is_file():
                    raise SourceError(
                        f"hf:{self.directory}: shard {name} is missing (it holds {key}, among "
                        "others); the checkpoint is incomplete: download it again"
                    )
                files.setdefault(path, []).append(key)  # type: ignore[union-attr]
            return files
        found = sorted(self.directory.glob("*.safetensors"))
        if not found:
            raise SourceError(f"hf:{self.directory} has no .safetensors weights")
        return {path: None for path in found}

    @property
    def float32_bytes(self) -> int:
        """The weights' size built in float32, as a compile in memory builds them."""
        return sum(_nbytes(t) // t.dtype.itemsize * 4 for t in self.tensors.values())


def _nbytes(stored: StoredTensor) -> int:
    count = 1
    for size in stored.shape:
        count *= size
    return count * stored.dtype.itemsize


def _read_header(file: Path, expected: list[str] | None) -> dict[str, StoredTensor]:
    """The tensors a safetensors file declares; refuses a file cut short of its data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
        if length > size - 8:
            raise SourceError(f"{file} is not a safetensors file, or is truncated (no header)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{file} has a damaged safetensors header ({e})") from e
    header.pop("__metadata__", None)
    tensors = {}
    for key, entry in header.items():
        begin, end = (8 + length + o for o in entry["data_offsets"])
        if end > size:
            raise SourceError(
                f"{file} is truncated: tensor {key} ends at byte {end} of a {size}-byte file; "
                "download the checkpoint again"
            )
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SourceError(
                f"{file}: tensor {key} has dtype {entry['dtype']}, which moec reads not"
            )
        stored = StoredTensor(file, key, dtype, tuple(entry["shape"]), begin)
        if end - begin != _nbytes(stored):
            raise SourceError(
                f"{file}: tensor {key} has {end - begin} bytes for its shape's {_nbytes(stored)}"
            )
        tensors[key] = stored
    return tensors


def has_safetensors(directory: Path) -> bool:
    return (directory / INDEX_FILE).is_file() or any(directory.glob("*.safetensors"))


def read_stored(stored: StoredTensor) -> torch.Tensor:
    """The tensor's bytes, read from its file (no mapping of the whole file)."""
    data = bytearray(_nbytes(stored))
    try:
        with open(stored.file, "rb") as f:
            f.seek(stored.offset)
            got = f.readinto(data)
    except OSError as e:
        raise SourceError(f"{stored.file}: cannot read tensor {stored.key} ({e})") from e
    if got != len(data):
        raise SourceError(
            f"{stored.file} is truncated: tensor {stored.key} has {got} of its {len(data)} bytes; "
            "download the checkpoint again"
        )
    if not data:
        return torch.empty(stored.shape, dtype=stored.dtype)
    return torch.frombuffer(data, dtype=stored.dtype).reshape(stored.shape)
