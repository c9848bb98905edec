"""`keep_tiny_constants`: an RMS norm's eps of 1e-12 survives onnxscript's optimizer, so a zero
row normalises to zero (not NaN) in ONNX Runtime, as in PyTorch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import torch
import torch.nn.functional as F

from moec.compiler.keep_tiny_constants import keep_tiny_constants


class TinyEpsNorm(torch.nn.Module):
    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), None, 1e-12) * 1.000001


def _optimized(keep: bool) -> tuple[ir.Model, int]:
    x = torch.randn(2, 8)
    model = torch.onnx.export(
        torch.export.export(TinyEpsNorm(), (x,)), (), dynamo=True, optimize=False
    ).model
    kept = keep_tiny_constants(model) if keep else 0
    onnxscript.optimizer.optimize(model)
    return model, kept


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString())
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_tiny_eps_and_near_one_factor_are_kept():
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    x[0] = 0
    expected = TinyEpsNorm()(torch.from_numpy(x)).numpy()
    model, kept = _optimized(keep=True)
    assert kept == 2
    assert [n.op_type for n in model.graph].count("Add") == 1
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-6, atol=0)


def test_without_it_the_optimizer_drops_the_eps():
    """The upstream behaviour the pass works around (fails once onnxscript fixes it)."""
    x = np.zeros((2, 8), np.float32)
    model, _ = _optimized(keep=False)
    assert "Add" not in [n.op_type for n in model.graph]
    assert np.isnan(_run(model, x)).all()
