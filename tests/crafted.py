"""Crafted ``.pt2`` archives: a saved program changed so that ``torch.export.load`` would run a
payload (which creates a marker file) by each route torch offers."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path


class Payload:
    """Unpickling it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    pickle.dump(Payload(marker), buffer)
    return buffer.getvalue()


def rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None], extra=()) -> Path:
    """Copy the archive ``src`` to ``dst``, each entry through ``change(name, data)``."""
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w") as out:
        for info in archive.infolist():
            data = change(info.filename, archive.read(info))
            if data is not None:
                out.writestr(info, data)
        for name, data in extra:
            out.writestr(name, data)
    return dst


def _edit_json(name: str, data: bytes, suffix: str, edit) -> bytes:
    if not name.endswith(suffix):
        return data
    document = json.loads(data)
    edit(document)
    return json.dumps(document).encode()


def _first_expression(document) -> dict:
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("expr_str"), str):
                return item
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    raise ValueError("the program has no symbolic expression")


def _first_node(document) -> dict:
    return document["graph_module"]["graph"]["nodes"][0]


def craft(kind: str, src: Path, dst: Path, marker: Path) -> Path:
    """``src`` (a saved program with a dynamic dim) made to run the payload by route ``kind``."""
    payload = pickled(marker)

    def sample_inputs(name, data):
        return payload if "sample_inputs/" in name else data

    def weight_pickle(name, data):
        def mark(config):
            next(iter(config["config"].values()))["use_pickle"] = True

        data = _edit_json(name, data, "_weights_config.json", mark)
        return payload if name.endswith(f"/data/weights/{_first_weight(src)}") else data

    def expression(name, data):
        def inject(document):
            _first_expression(document)["expr_str"] = f"open({str(marker)!r}, 'w') and s0"

        return _edit_json(name, data, "models/model.json", inject)

    def target(name, data):
        def inject(document):
            _first_node(document)["target"] = "torch.save"

        return _edit_json(name, data, "models/model.json", inject)

    changes = {
        "sample-inputs": sample_inputs,
        "pickled-weight": weight_pickle,
        "sympy-expression": expression,
        "node-target": target,
    }
    if kind == "native-library":
        root = zipfile.ZipFile(src).namelist()[0].split("/", 1)[0]
        return rewrite(src, dst, lambda n, d: d, [(f"{root}/data/aotinductor/model/x.so", b"")])
    return rewrite(src, dst, changes[kind])


def _first_weight(src: Path) -> str:
    with zipfile.ZipFile(src) as archive:
        name = next(n for n in archive.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(archive.read(name))
    return next(iter(config["config"].values()))["path_name"]


KINDS = ("sample-inputs", "pickled-weight", "sympy-expression", "node-target", "native-library")
