"""How much memory this process may still take: the machine's available memory, lowered by
the process's own limits (``ulimit -v``: RLIMIT_AS; RLIMIT_DATA) where they are set."""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["available_memory"]


def available_memory() -> int:
    """Bytes this process may still allocate, as far as the OS tells (Linux: MemAvailable)."""
    found = [_machine_available()]
    for limit, usage in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            found.append(max(0, soft - _status_bytes(usage)))
    return min(found)


def _machine_available() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` size (VmSize, VmData) in bytes; 0 where there is none."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0
