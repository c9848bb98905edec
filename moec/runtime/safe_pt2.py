"""Loading a ``.pt2`` (``torch.export.save``) without running code from it.

``torch.export.load`` trusts its archive: it unpickles (``weights_only=False``) every weight or
constant marked ``use_pickle`` and custom or opaque objects, retries sample inputs that fail a
safe load with ``weights_only=False``, evaluates every symbolic shape expression with
``sympy.sympify`` (an ``eval``), loads AOTInductor libraries, and a node may name any attribute
of ``torch`` as the function it calls. So before torch reads an archive, `load_pt2` checks it:

- every entry is one a saved ExportedProgram has (no AOTInductor or other native payloads);
- no weight or constant needs pickle, and no custom or opaque object is present;
- every shape expression is a plain sympy ``srepr`` of known functions, numbers and symbol names;
- every node calls an operator (``torch.ops.NS.OP.OVERLOAD``), a symbolic-int function or a
  plain arithmetic function;

and torch then loads it with every ``torch.load`` held to ``weights_only=True``. With
``trust_pickle`` (``--trust-pickle``) none of this applies. torch's own warnings and logs during
a load are silenced: a damaged archive gives one clear error.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from moec.errors import MoecError

__all__ = ["UNSAFE_HINT", "load_pt2", "unsafe_entries"]

UNSAFE_HINT = (
    "moec never runs code from an archive: load it with --trust-pickle (trust_pickle=True) "
    "only if you trust its origin, or export and save it again with torch.export.save"
)
# the entries of an archive torch.export.save writes, below its root folder
SAFE_ENTRIES = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/weights/[\w.-]+|data/constants/[\w.-]+"
    r"|data/sample_inputs/[\w.-]+\.pt|extra/[\w.-]+\.json)"
)
SAFE_TARGET = re.compile(
    r"torch\.ops\.\w+\.\w+\.\w+|torch\.ops\.higher_order\.\w+|torch\.(_?sym_\w+|_check\w*)"
    r"|_operator\.(getitem|add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|invert|and_|or_"
    r"|xor|not_|eq|ne|lt|le|gt|ge|lshift|rshift|matmul)|math\.\w+"
)
# srepr of sympy expressions: known names, quoted symbol names, numbers, ( ) , = and spaces
SYMPY_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z]\w*)|'(?P<symbol>[A-Za-z]\w*)'|(?P<number>-?\d+(\.\d+)?(e-?\d+)?)"
    r"|(?P<punct>[(),=-]))"
)
SYMPY_NAMES = frozenset(
    [
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Mul",
        "Add",
        "Pow",
        "Max",
        "Min",
        "Mod",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
        "Abs",
        "floor",
        "ceiling",
        "Piecewise",
        "ExprCondPair",
        "true",
        "false",
        "BooleanTrue",
        "BooleanFalse",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "NaN",
        "S",
        "Zero",
        "One",
        "NegativeOne",
        "Half",
        "IntegerConstant",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
        "IntTrueDiv",
        "FloatTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "OpaqueUnaryFn_sqrt",
        "BitwiseFn_bitwise_and",
        "BitwiseFn_bitwise_or",
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "nonzero",
        "zero",
        "even",
        "odd",
        "commutative",
        "True",
        "False",
    ]
)
MAX_JSON_BYTES = 1 << 31


def load_pt2(
    path: Path, *, trust_pickle: bool, error: type[MoecError], what: str
) -> ExportedProgram:
    """The program saved at ``path``; ``error`` (naming ``what``) when it is unreadable or
    would run code and ``trust_pickle`` is not given."""
    if not trust_pickle:
        found = unsafe_entries(path, error, what)
        if found:
            raise error(
                f"{what} {path} would run code when loaded ({'; '.join(found[:3])}). {UNSAFE_HINT}"
            )
    try:
        with _quiet(), _weights_only(trust_pickle, error, what, path):
            return torch.export.load(path)
    except MoecError:
        raise
    except Exception as e:  # zipfile, json, pickle and torch errors: not a valid archive
        raise error(
            f"{what} {path} is not a readable .pt2 archive ({type(e).__name__}: "
            f"{_first_line(e)}); it may be truncated or corrupt: save it again with "
            "torch.export.save"
        ) from e


def unsafe_entries(path: Path, error: type[MoecError], what: str) -> list[str]:
    """Why loading the archive at ``path`` with torch would run code (empty: it would not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            roots = {info.filename.split("/", 1)[0] for info in infos}
            found = []
            for info in infos:
                relative = info.filename.split("/", 1)[-1]
                if info.is_dir() or not relative:
                    continue
                if len(roots) != 1 or not SAFE_ENTRIES.fullmatch(relative):
                    found.append(f"entry {info.filename} is not part of a saved program")
                elif relative.endswith("_config.json"):
                    found += _pickled_payloads(info.filename, _json(archive, info))
                elif relative.endswith(".pt") and not _loads_without_pickle(archive, info):
                    found.append(f"entry {info.filename} only loads by unpickling")
                elif relative.startswith("models/"):
                    found += _unsafe_graph(info.filename, _json(archive, info))
            return found
    except (zipfile.BadZipFile, OSError, ValueError, RecursionError) as e:
        raise error(
            f"{what} {path} is not a readable .pt2 archive ({type(e).__name__}: "
            f"{_first_line(e)}); it may be truncated or corrupt: save it again with "
            "torch.export.save"
        ) from e


def _loads_without_pickle(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """Whether a torch.save entry (sample inputs, legacy weights) loads with weights_only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(archive.read(info)), weights_only=True)
    except Exception:  # any failure means torch would retry with weights_only=False
        return False
    return True


def _json(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > MAX_JSON_BYTES:
        raise ValueError(f"{info.filename} is {info.file_size} bytes")
    return json.loads(archive.read(info))


def _pickled_payloads(entry: str, config: Any) -> list[str]:
    payloads = config.get("config", {}) if isinstance(config, dict) else {}
    if not isinstance(payloads, dict):
        return [f"{entry} is not a payload config"]
    found = []
    for name, meta in payloads.items():
        meta = meta if isinstance(meta, dict) else {}
        file = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or file.startswith(("custom_obj_", "opaque_obj_")):
            found.append(f"{name} ({entry}: {file}) is unpickled")
    return found


def _unsafe_graph(entry: str, program: Any) -> list[str]:
    """The node targets and shape expressions of a serialized program that are not plain."""
    found: list[str] = []
    for key, value, node in _strings(program):
        if key == "expr_str" and not _plain_sympy(value):
            found.append(f"shape expression {value[:60]!r} in {entry} is not a plain expression")
        elif key == "target" and "inputs" in node and not SAFE_TARGET.fullmatch(value):
            found.append(f"node target {value[:60]!r} in {entry} is not an operator")
    return found


def _strings(value: Any, key: str = "", node: Any = None) -> Iterator[tuple[str, str, Any]]:
    """(key, string, the object holding it) for every string in a JSON document."""
    stack = [(key, value, node)]
    while stack:
        key, value, node = stack.pop()
        if isinstance(value, str):
            yield key, value, node if isinstance(node, dict) else {}
        elif isinstance(value, dict):
            stack += [(k, v, value) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(key, v, node) for v in value]


@functools.lru_cache(maxsize=4096)
def _plain_sympy(text: str) -> bool:
    position = 0
    while position < len(text):
        match = SYMPY_TOKEN.match(text, position)
        if match is None or match.end() == position:
            return text[position:].strip() == ""
        name = match.group("name")
        if name is not None and name not in SYMPY_NAMES:
            return False
        position = match.end()
    return True


@contextlib.contextmanager
def _weights_only(trusted: bool, error: type[MoecError], what: str, path: Path) -> Iterator[None]:
    """Hold every ``torch.load`` to ``weights_only=True`` while torch reads the archive."""
    if trusted:
        yield
        return
    original = torch.load

    def safe_load(*args, weights_only: Any = None, **kwargs):
        if weights_only is False:
            raise error(
                f"{what} {path} has an entry that only loads by unpickling (torch retried it with "
                f"weights_only=False). {UNSAFE_HINT}"
            )
        return original(*args, weights_only=True, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch's loggers and warnings say nothing while it reads an archive."""
    loggers = [logging.getLogger(name) for name in ("torch._export", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
