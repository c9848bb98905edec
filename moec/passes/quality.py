"""The quality report of the lossy passes, measured on the held-out calibration rows.

- per block: relative L2 error of the compressed block's output against the block before the
  passes, both fed the inputs the block sees in the model before the passes;
- for a language model (token ids in, logits [B, S, V] out): perplexity of the held-out rows
  before and after, and how often the next-token top-1 prediction stays the same;
- parameters and bytes of the model and of its MoE blocks, before and after (bytes as stored:
  int4 codes at half a byte).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moec.compiler.moe_block import MoEBlock
from moec.ir.moe_weights import QUANTIZED
from moec.models.quantized_linear import QuantizedLinear
from moec.passes.calibration import model_inputs
from moec.passes.compression_state import BATCH_ROWS, CompressionState

__all__ = ["first_output", "is_logits", "quality_report", "stored_bytes"]


def quality_report(state: CompressionState) -> dict[str, Any]:
    held = state.calibration.held_out
    errors = {name: [0.0, 0.0] for name in state.blocks}
    reference_blocks = {name: _module(state.reference, name) for name in state.blocks}

    def hook(name: str):
        def compare(module, args, kwargs, output):
            new = state.blocks[name](*args, **kwargs)
            errors[name][0] += float((new - output).double().square().sum())
            errors[name][1] += float(output.double().square().sum())

        return compare

    handles = [
        module.register_forward_hook(hook(name), with_kwargs=True)
        for name, module in reference_blocks.items()
    ]
    lm = {"nll_before": 0.0, "nll_after": 0.0, "same_top1": 0, "positions": 0}
    try:
        with torch.no_grad():
            for start in range(0, len(held), BATCH_ROWS):
                rows = held[start : start + BATCH_ROWS]
                inputs = model_inputs(state.source, rows)
                before = first_output(state.reference(*inputs))
                after = first_output(state.model(*inputs))
                if state.calibration.is_token_ids and is_logits(before, inputs[0]):
                    _add_lm_figures(lm, before, after, inputs[0])
    finally:
        for h in handles:
            h.remove()
    report: dict[str, Any] = {
        "held_out_rows": len(held),
        "blocks": [
            {"block": name, "rel_error": math.sqrt(err / ref) if ref else 0.0}
            for name, (err, ref) in errors.items()
        ],
    }
    if lm["positions"]:
        n = lm["positions"]
        report["perplexity"] = {
            "before": math.exp(lm["nll_before"] / n),
            "after": math.exp(lm["nll_after"] / n),
        }
        report["top1_agreement"] = lm["same_top1"] / n
    report["parameters"] = _sizes(state.reference, state.model)
    moe = [n for n, b in state.blocks.items() if not isinstance(b, QuantizedLinear)]
    report["moe_parameters"] = _sizes(
        nn.ModuleList(reference_blocks[n] for n in moe), nn.ModuleList(state.blocks[n] for n in moe)
    )
    return report


def _module(root: nn.Module, name: str) -> nn.Module:
    return root if name == "" else root.get_submodule(name)


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def is_logits(out: torch.Tensor, ids: torch.Tensor) -> bool:
    return out.dim() == 3 and tuple(out.shape[:2]) == tuple(ids.shape) and ids.shape[1] > 1


def _add_lm_figures(lm: dict, before: torch.Tensor, after: torch.Tensor, ids: torch.Tensor):
    targets = ids[:, 1:].reshape(-1)
    for key, logits in (("nll_before", before), ("nll_after", after)):
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
        lm[key] += float(torch.nn.functional.cross_entropy(flat, targets, reduction="sum"))
    lm["same_top1"] += int((before[:, :-1].argmax(-1) == after[:, :-1].argmax(-1)).sum())
    lm["positions"] += int(targets.numel())


def _sizes(before: nn.Module, after: nn.Module) -> dict[str, float]:
    def count(module: nn.Module) -> tuple[int, int]:
        return sum(p.numel() for p in module.parameters()), stored_bytes(module)

    (n0, b0), (n1, b1) = count(before), count(after)
    return {
        "before": n0,
        "after": n1,
        "bytes_before": b0,
        "bytes_after": b1,
        "reduction": 1 - n1 / n0 if n0 else 0.0,
    }


def stored_bytes(module) -> int:
    """Bytes of ``module``'s parameters as an artifact stores them: the codes and zero points of
    a quantised block or layer at their bits each (packed), everything else at its dtype's size."""
    total = 0
    for sub in module.modules():
        bits = sub.spec.weight_bits if isinstance(sub, MoEBlock) else None
        if isinstance(sub, QuantizedLinear):
            bits = sub.bits
        for pname, p in sub.named_parameters(recurse=False):
            codes = pname in QUANTIZED or pname in ("codes", "zero") or pname.endswith("_zero")
            packed = bits is not None and codes
            total += p.numel() * bits // 8 if packed else p.numel() * p.element_size()
    return total
