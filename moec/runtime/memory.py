"""How much memory this process may still take: the machine's available memory, lowered by
the process's own limits (``ulimit -v``: RLIMIT_AS; RLIMIT_DATA) where they are set."""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["available_memory"]


def available_memory() -> int:
    """Bytes this process may still allocate, as far as the OS tells (Linux: MemAvailable)."""
    machine = _proc_bytes("/proc/meminfo", "MemAvailable")
    if machine is None:
        machine = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    found = [machine]
    for limit, usage in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            found.append(max(0, soft - (_proc_bytes("/proc/self/status", usage) or 0)))
    return min(found)


def _proc_bytes(path: str, field: str) -> int | None:
    """A size ``/proc`` gives in kB (MemAvailable, VmSize, VmData), in bytes; None if absent."""
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None
