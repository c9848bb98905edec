"""Calibration data for the lossy passes.

``--calib FILE``: a ``.npy`` of the model's first input (token ids [N, S] for a language model;
float [N, S, H] for a bare block), or a text file tokenised with the model's own tokenizer and cut
into sequences of ``seq_len`` tokens. The last tenth of the sequences (at least one) is held out
for the quality report; the passes fit on the rest. Other inputs are filled in the one way the
model allows (an attention mask of ones; decoder ids equal to the ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moec.errors import CalibrationError
from moec.models import ModelSource

__all__ = ["CalibrationData", "load_calibration", "model_inputs"]

HELD_OUT_FRACTION = 0.1
DEFAULT_SEQ_LEN = 128


@dataclass
class CalibrationData:
    """Rows of the model's first input: ``fit`` for the passes, ``held_out`` for the report."""

    fit: np.ndarray
    held_out: np.ndarray
    origin: str

    @property
    def is_token_ids(self) -> bool:
        return np.issubdtype(self.fit.dtype, np.integer)

    def summary(self) -> dict[str, object]:
        return {
            "file": self.origin,
            "fit_rows": int(self.fit.shape[0]),
            "held_out_rows": int(self.held_out.shape[0]),
            "row_shape": list(self.fit.shape[1:]),
        }


def load_calibration(
    path: str | Path,
    source: ModelSource,
    samples: int | None = None,
    seq_len: int | None = None,
) -> CalibrationData:
    """Read ``path`` for ``source``'s model and split it; errors name the file and the fix.

    ``seq_len`` (text files): tokens per sequence, default 128 or the model's longest.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"--calib {path}: no such file")
    if samples is not None and samples < 2:
        raise CalibrationError(
            f"--calib-samples must be >= 2 (one to fit, one held out), not {samples}"
        )
    if path.suffix == ".npy":
        try:
            rows = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CalibrationError(f"--calib {path}: not a readable .npy file ({e})") from e
    else:
        longest = _max_seq(source)
        default = DEFAULT_SEQ_LEN if longest is None else min(DEFAULT_SEQ_LEN, longest)
        rows = _tokenise(path, source, seq_len or default)
    if samples is not None:
        rows = rows[:samples]
    _check_rows(rows, path, source)
    held = max(1, round(len(rows) * HELD_OUT_FRACTION))
    return CalibrationData(rows[:-held], rows[-held:], str(path))


def model_inputs(source: ModelSource, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Positional inputs for a batch of first-input ``rows``."""
    first = torch.from_numpy(np.ascontiguousarray(rows))
    if first.is_floating_point():
        first = first.to(source.example_inputs[0].dtype)
    names = source.input_names or []
    inputs = [first]
    for i in range(1, len(source.example_inputs)):
        name = names[i] if i < len(names) else f"input {i}"
        low_high = source.input_ranges.get(name)
        if source.roles.get(name) == "mask":  # every token attended
            inputs.append(torch.ones(first.shape[:2], dtype=torch.long))
        elif low_high is not None and low_high[1] - low_high[0] == 1:  # one valid value
            inputs.append(torch.full(first.shape[:2], low_high[0], dtype=torch.long))
        elif name == "decoder_input_ids":
            inputs.append(first)
        else:
            raise CalibrationError(
                f"calibration data gives the model's first input only; moec cannot fill in "
                f"input {name!r}"
            )
    return tuple(inputs)


def _tokenise(path: Path, source: ModelSource, seq_len: int) -> np.ndarray:
    if source.tokenizer is None:
        raise CalibrationError(
            f"--calib {path}: a text file needs the model's tokenizer, and this source has none; "
            "give token ids as a .npy [N, S]"
        )
    if seq_len < 2:
        raise CalibrationError(f"calibration sequence length must be >= 2, not {seq_len}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"--calib {path}: not UTF-8 text ({e})") from e
    ids = np.asarray(source.tokenizer(text), dtype=np.int64)
    count = len(ids) // seq_len
    if count < 2:
        raise CalibrationError(
            f"--calib {path}: {len(ids)} tokens make fewer than 2 sequences of {seq_len}; "
            "give more text"
        )
    return ids[: count * seq_len].reshape(count, seq_len)


def _check_rows(rows: np.ndarray, path: Path, source: ModelSource) -> None:
    example = source.example_inputs[0]
    name = (source.input_names or ["input 0"])[0]
    want = (
        f"{example.dim()}-D like the model's {name!r} [N, {', '.join(map(str, example.shape[1:]))}]"
    )
    if rows.ndim != example.dim():
        raise CalibrationError(f"--calib {path}: shape {rows.shape}; expected {want}")
    longest = _max_seq(source)
    if longest is not None and rows.ndim >= 2 and rows.shape[1] > longest:
        raise CalibrationError(
            f"--calib {path}: sequences of {rows.shape[1]}; the model takes at most {longest}"
        )
    if len(rows) < 2:
        raise CalibrationError(f"--calib {path}: {len(rows)} row(s); need >= 2 (fit + held out)")
    if example.is_floating_point():
        if not np.issubdtype(rows.dtype, np.floating):
            raise CalibrationError(f"--calib {path}: dtype {rows.dtype}; {name!r} is float")
        if rows.shape[2:] != tuple(example.shape[2:]):
            raise CalibrationError(f"--calib {path}: shape {rows.shape}; expected {want}")
        return
    if not np.issubdtype(rows.dtype, np.integer):
        raise CalibrationError(f"--calib {path}: dtype {rows.dtype}; {name!r} takes token ids")
    low, high = source.input_ranges.get(name, (0, None))
    if rows.min() < low or (high is not None and rows.max() >= high):
        raise CalibrationError(
            f"--calib {path}: token ids span [{rows.min()}, {rows.max()}], outside the model's "
            f"vocabulary [{low}, {high}); was it tokenised for another model?"
        )


def _max_seq(source: ModelSource) -> int | None:
    """The longest sequence the source's dynamic shapes allow, if they bound it."""
    try:
        longest = getattr(source.dynamic_shapes[0][1], "max", None)
    except (TypeError, KeyError, IndexError):
        return None
    return longest if isinstance(longest, int) and longest < 1 << 30 else None
