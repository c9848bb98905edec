"""``moec check-trt`` and ``moec build-engine``: the TensorRT target's commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from moec.cli_common import console, friendly_errors, human_bytes
from moec.errors import UsageError

__all__ = ["build_engine_command", "check_trt_command"]


@click.command("check-trt")
@click.argument("path", type=click.Path(path_type=Path))
@friendly_errors
def check_trt_command(path: Path) -> None:
    """Check that TensorRT's ONNX parser takes every node of OUT (an artifact) or of a .onnx
    file; print each node it would not take, and exit 1 if there is any. Needs no TensorRT."""

    from moec.compiler.trt_check import check_trt, count_nodes, load_onnx, op_table
    from moec.compiler.trt_profiles import profile_dims
    from moec.runtime.manifest import Manifest

    blocks: list[str] = []
    dims: dict[str, list[int]] = {}
    model_path = path
    if path.is_dir():
        manifest = Manifest.read(path)
        model_path = path / manifest.files["model"].path
        if model_path.suffix != ".onnx":
            raise UsageError(
                f"{path} is a {manifest.target!r} artifact, which holds no ONNX; check-trt reads "
                "the ONNX of an ort, onnx or trt artifact, or a .onnx file"
            )
        blocks = [b.get("name") or "" for b in manifest.blocks]
        dims = manifest.build.get("dims") or profile_dims(manifest.inputs)
    elif not path.is_file():
        raise UsageError(f"{path} is neither an artifact directory nor a .onnx file")
    model = load_onnx(model_path)
    problems = check_trt(model, blocks, {name: r[2] for name, r in dims.items()})
    table = op_table()
    nodes = count_nodes(model.graph)
    if not problems:
        console.print(
            f"[green]ok:[/] TensorRT {table.tensorrt}'s ONNX parser takes all {nodes} nodes of "
            f"{escape(str(model_path))} (by onnx-tensorrt's operator table; no TensorRT ran)"
        )
        return
    rows = Table("node", "op", "from", "why", title=f"nodes TensorRT {table.tensorrt} would refuse")
    for p in problems:
        rows.add_row(escape(p.node), p.op, escape(p.block), escape(p.reason))
    console.print(rows)
    console.print(
        f"[red]{len(problems)} of {nodes} nodes[/] of {escape(str(model_path))} are not "
        f"TensorRT {table.tensorrt}'s (source: {escape(table.source)})"
    )
    sys.exit(1)


@click.command("build-engine")
@click.argument("out", type=click.Path(path_type=Path))
@friendly_errors
def build_engine_command(out: Path) -> None:
    """Build the TensorRT engine of the trt artifact OUT on this machine (TensorRT >= 10 and
    an NVIDIA GPU) and record it in OUT's manifest."""
    from moec.compiler.trt_artifact import build_engine_in_place

    manifest = build_engine_in_place(out)
    engine, entry = manifest.build["engine"], manifest.files["engine"]
    console.print(
        f"built {escape(str(out / entry.path))} ({human_bytes(entry.bytes)}, "
        f"{manifest.build['precision']}) with TensorRT {engine['tensorrt']} for "
        f"{escape(engine['gpu'])} (compute capability {engine['compute_capability']})"
    )
