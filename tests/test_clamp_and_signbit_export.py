"""Two ops Kolibri 1.1's NVFP4 rounding needs in ONNX: a clamp with a float and an int bound
(`clamp_bounds_as_floats`) and ``copysign``, whose ``signbit`` ONNX lacks (`translate_signbit`);
each exported and run in ONNX Runtime against PyTorch, negative zeros included."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from moec.compiler.clamp_bounds import clamp_bounds_as_floats
from moec.compiler.lower_onnx import translate_signbit


class Rounding(torch.nn.Module):
    def forward(self, x, sign):
        return x.abs().clamp(2**-9, 448).copysign(sign)


def _export(rewrite: bool):
    x = torch.randn(4, 8)
    program = torch.export.export(Rounding(), (x, -x)).run_decompositions({})
    rewritten = clamp_bounds_as_floats(program) if rewrite else 0
    table = {torch.ops.prims.signbit.default: translate_signbit}
    onnx_program = torch.onnx.export(
        program, (), dynamo=True, custom_translation_table=table, verbose=False
    )
    return onnx_program.model_proto, rewritten


def test_rounding_exports_and_matches():
    model, rewritten = _export(rewrite=True)
    assert rewritten == 1
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32) * 300
    sign = np.array([[-0.0, 0.0, -1.0, 2.0] * 2] * 4, np.float32)
    session = ort.InferenceSession(model.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, dict(zip(names, (x, sign), strict=True)))[0]
    expected = Rounding()(torch.from_numpy(x), torch.from_numpy(sign)).numpy()
    np.testing.assert_array_equal(out, expected)
    assert np.array_equal(np.signbit(out), np.signbit(expected))


def test_mixed_clamp_bounds_fail_without_the_rewrite():
    """torch.onnx's behaviour the rewrite works around (fails once torch.onnx fixes it)."""
    with pytest.raises(Exception, match=r"compatible OpOverload for aten\.clamp"):
        _export(rewrite=False)
