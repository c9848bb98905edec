"""What the ``moec`` commands share: the consoles, the bad-input handler, byte sizes."""

from __future__ import annotations

import functools
import sys

from rich.console import Console
from rich.markup import escape

from moec.errors import MoecError

__all__ = ["console", "err_console", "friendly_errors", "human_bytes"]

console = Console()
err_console = Console(stderr=True)


def friendly_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MoecError as e:
            err_console.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            sys.exit(2)

    return wrapper


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
