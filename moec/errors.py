"""Typed errors. Every message names the input that was wrong and what to do about it.

The CLI turns a `MoecError` into one line on stderr and exit code 2; anything else is a bug in
moec and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "CalibrationError",
    "CaptureError",
    "InputError",
    "LoweringError",
    "MoecError",
    "OutOfMemoryError",
    "PassError",
    "RuntimeUnavailableError",
    "SettingsError",
    "SourceError",
    "SpecError",
    "TargetNotBuiltError",
    "UnsupportedBlockError",
    "UsageError",
    "VerificationError",
]


class MoecError(Exception):
    """Base class of every error moec raises on bad input."""


class SourceError(MoecError):
    """The model source (SRC) is missing, unreadable, or of a form moec refuses to load."""


class NotStreamableError(SourceError):
    """A checkpoint's weights cannot be left on disk for this model (a weight the checkpoint
    lacks, or one the model computes itself); the compile builds it in memory instead."""


class SpecError(MoecError):
    """An MoE block's configuration (MoESpec) or its weights are inconsistent."""


class SettingsError(MoecError):
    """Compile settings that contradict each other or name an unknown target or lowering."""


class CaptureError(MoecError):
    """torch.export could not trace the model (outside the MoE blocks moec replaces)."""


class CalibrationError(MoecError):
    """Calibration data that cannot drive this model."""


class PassError(MoecError):
    """A pass left the program inconsistent or broke its in-place promise; names the pass."""


class UnsupportedBlockError(MoecError):
    """A module looks like an MoE block but moec cannot convert it; the message says why."""


class LoweringError(MoecError):
    """An operation in the captured program has no lowering for the chosen target."""


class TargetNotBuiltError(MoecError):
    """The requested target is not available in this build or on this machine."""


class RuntimeUnavailableError(MoecError):
    """An artifact's runtime cannot run it on this machine (a TensorRT artifact without its
    engine, or without TensorRT and a GPU here); the message names how to finish it."""


class ArtifactError(MoecError):
    """An artifact directory is missing, incomplete, edited, or would be overwritten."""


class InputError(MoecError):
    """Run-time inputs do not match the artifact's declared inputs."""


class OutOfMemoryError(MoecError):
    """The process ran out of memory (its own limit, or the machine's); names the stage."""


class UsageError(MoecError):
    """moec's API used out of order (a runner called before it was activated)."""


class VerificationError(MoecError):
    """Verification could not run (not: it ran and found errors out of tolerance)."""
