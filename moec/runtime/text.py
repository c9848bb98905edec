"""Text in and out of an artifact that carries its source's ``tokenizer.json`` (read with the
``tokenizers`` library: no model code, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moec.errors import ArtifactError, InputError

__all__ = ["ArtifactTokenizer"]


class ArtifactTokenizer:
    def __init__(self, directory: Path, files: dict, pad_id: int):
        entry = files.get("tokenizer")
        if entry is None:
            raise ArtifactError(
                f"{directory} carries no tokenizer: moec generate takes text for artifacts "
                "compiled from an hf: directory with a tokenizer.json; give token ids to "
                "moec.load(OUT).generate instead"
            )
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(directory) / entry.path))
        self.pad_id = pad_id

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [batch, longest] left-padded, and their attention mask."""
        rows = [self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        for prompt, row in zip(prompts, rows, strict=True):
            if not row:
                raise InputError(f"the prompt {prompt[:40]!r} tokenises to nothing; give some text")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
        return ids, mask

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
