"""Whether TensorRT can run here, and what an engine built here is tied to. Imports TensorRT
and torch only when asked."""

from __future__ import annotations

__all__ = ["INSTALL", "MIN_TENSORRT", "engine_mismatch", "engine_record", "tensorrt_missing"]

MIN_TENSORRT = (10, 0)
INSTALL = "pip install 'moec[trt]' on a machine with an NVIDIA GPU and its CUDA driver"


def tensorrt_missing() -> str | None:
    """Why an engine cannot be built or run here (None: TensorRT >= 10 and a CUDA GPU are)."""
    try:
        import tensorrt as trt
    except ImportError:
        return f"TensorRT is not installed ({INSTALL})"
    version = _version(trt.__version__)
    if version[:2] < MIN_TENSORRT:
        return f"TensorRT {trt.__version__} is older than 10 ({INSTALL})"
    try:
        import torch
    except ImportError:
        return "TensorRT runs through torch's CUDA here, and torch is not installed"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU is visible (torch.cuda.is_available() is False)"
    return None


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def engine_record(device: int = 0) -> dict[str, str]:
    """What an engine built here is tied to: the TensorRT version and the GPU."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return {
        "tensorrt": trt.__version__,
        "compute_capability": f"{major}.{minor}",
        "gpu": torch.cuda.get_device_name(device),
    }


def engine_mismatch(built: dict[str, str], device: int = 0) -> str | None:
    """How the TensorRT and GPU an engine was built for (``built``: `engine_record` then)
    differ from this machine's (None: they match)."""
    here = engine_record(device)
    changed = [
        f"{what} {built.get(key)} (this machine: {here[key]})"
        for key, what in (("tensorrt", "TensorRT"), ("compute_capability", "compute capability"))
        if built.get(key) != here[key]
    ]
    return "; ".join(changed) or None
