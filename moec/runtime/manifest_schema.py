"""The JSON Schema of ``manifest.json``, and `validate`, which answers a document that breaks it
with one line naming the field.

A manifest is data an artifact's author wrote: every field has a type, a bound and, where it
names something, a pattern, so nothing in it reaches moec's code unchecked. Limits that JSON
Schema cannot state (file size, nesting depth, integer length, NaN) are `Manifest.read`'s.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from moec.errors import ArtifactError
from moec.ir.signature import DTYPES, ROLES

__all__ = ["SCHEMA", "validate"]

MAX_ITEMS = 100_000
MAX_TEXT = 100_000
INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
SIZE = {"type": "integer", "minimum": 0, "maximum": 2**62}
TEXT = {"type": "string", "maxLength": MAX_TEXT}
NAME = {"type": "string", "minLength": 1, "maxLength": 1024}
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
PLAIN_FILE = {"type": "string", "pattern": r"^(?!\.\.?$)[^/\\]{1,255}$"}
OBJECT = {"type": "object", "maxProperties": MAX_ITEMS}


def _array(items: dict) -> dict:
    return {"type": "array", "items": items, "maxItems": MAX_ITEMS}


DIM_SIZE = {"type": "integer", "minimum": 0, "maximum": 2**31}
DIM = {
    "oneOf": [
        DIM_SIZE,
        {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": NAME,
                "min": DIM_SIZE,
                "max": {"oneOf": [DIM_SIZE, {"type": "null"}]},
                "sum_of": {**_array(NAME), "maxItems": 8},
            },
        },
    ]
}
TENSOR = {
    "type": "object",
    "required": ["name", "dtype", "shape"],
    "additionalProperties": False,
    "properties": {
        "name": NAME,
        "dtype": {"enum": list(DTYPES)},
        "shape": {"type": "array", "items": DIM, "maxItems": 64},
        "role": {"enum": list(ROLES)},
        "block": {"oneOf": [TEXT, {"type": "null"}]},
        "value_range": {
            "oneOf": [
                {"type": "array", "items": INT64, "minItems": 2, "maxItems": 2},
                {"type": "null"},
            ]
        },
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "format_version", "target", "source", "inputs", "outputs", "files"],
    "additionalProperties": False,
    "properties": {
        "format": {"type": "string"},
        "format_version": {"type": "integer"},
        "target": NAME,
        "source": {
            "type": "object",
            "required": ["spec", "kind", "sha256"],
            "additionalProperties": False,
            "properties": {
                "spec": TEXT,
                "kind": NAME,
                "sha256": SHA256,
                "path": TEXT,
                "example_inputs_file": TEXT,
            },
        },
        "inputs": {**_array(TENSOR), "minItems": 1},
        "outputs": {**_array(TENSOR), "minItems": 1},
        "files": {
            **OBJECT,
            "required": ["model"],
            "additionalProperties": {
                "type": "object",
                "required": ["path", "bytes", "sha256"],
                "additionalProperties": False,
                "properties": {"path": PLAIN_FILE, "bytes": SIZE, "sha256": SHA256},
            },
        },
        "blocks": _array(OBJECT),
        "passes": _array(OBJECT),
        "tolerances": OBJECT,  # written by earlier versions; never read
        "versions": {**OBJECT, "additionalProperties": TEXT},
        "notes": _array(TEXT),
        "compression": OBJECT,
        "settings": OBJECT,
        "decoding": OBJECT,
        "build": OBJECT,
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def validate(data: Any, where: str) -> None:
    """Raise `ArtifactError` naming the first field of ``data`` that breaks `SCHEMA`."""
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(data))
    if error is not None:
        raise ArtifactError(f"{where}: {_explain(error)}")


def _explain(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    path = path.lstrip(".")
    field = path.rsplit(".", 1)[-1] if path else "the manifest"
    value = repr(error.instance)
    value = value if len(value) <= 60 else value[:57] + "..."
    kind = error.validator
    if kind == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return f"{path + ' ' if path else ''}needs '{missing[0]}'"
    if kind == "enum":
        return f"{path}: '{field}' must be one of {tuple(error.validator_value)}, not {value}"
    if kind == "pattern" and error.validator_value == PLAIN_FILE["pattern"]:
        return f"{path} must be a plain file name, not {value}"
    if kind == "additionalProperties":
        return f"{path or 'the manifest'} has a field moec does not know ({error.message})"
    return f"{path or 'the manifest'}: {error.message[:200]}"
