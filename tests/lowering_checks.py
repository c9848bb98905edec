"""Checks shared by the lowering tests: compile a block with one lowering on the target that
runs it, and verify the artifact against eager PyTorch."""

from __future__ import annotations

import pytest

import moec
from moec import registry
from moec.errors import LoweringError
from moec.ir import MoESpec

DROPLESS = 1000.0  # a capacity factor that gives every expert T slots


def assert_verified(report, blocks: int):
    assert report, report.to_dict()
    shapes = [tuple(next(iter(s.values()))) for s in report.shapes]
    assert len(shapes) >= 3 and any(s[0] == 1 for s in shapes) and any(s[1] == 1 for s in shapes)
    assert all(o.rel_l2 <= 1e-5 for o in report.outputs)
    assert len(report.routing) == blocks
    assert all(r.agreement >= 0.999 and r.tokens > 0 for r in report.routing)


def compile_with_lowering(model, example: tuple, spec: MoESpec, lowering: str, output):
    """``moec.compile`` of ``model`` (whose one block is ``spec``) with ``lowering``, on torch
    for its kernels and ort otherwise, capacity dropless. A lowering that cannot compute the
    block must be refused with `LoweringError` (then None); capacity keeps such a block exact."""
    target = "torch" if lowering in registry.lowerings_for("torch") else "ort"
    args = dict(target=target, lowering=lowering, output=output)
    if lowering == "capacity":
        args["capacity"] = DROPLESS
    if registry.lowering(lowering).unsupported_reasons(spec) and lowering != "capacity":
        with pytest.raises(LoweringError):
            moec.compile(model, example, **args)
        return None
    return moec.compile(model, example, **args)
