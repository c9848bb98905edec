"""What the lossy passes work on: a copy of the source model with its MoE blocks swapped for
moec's op blocks, the calibration data, and each block's routed statistics, collected once on
the calibration data and shared by the passes (collected again only after a pass changed a block).

Lossy passes change the number and shape of experts, so they run on this eager model before
capture, and torch.export then traces the result like any other model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from moec.compiler.capture import swap_blocks
from moec.compiler.moe_block import MoEBlock, experts_call_args
from moec.errors import MoecError
from moec.ir import MoESpec, MoEWeights, map_experts, route, router_logits
from moec.ir.expert_kernels import expert_ffn
from moec.ir.moe_op import scatter_routing
from moec.ir.moe_weights import EXPERT_WEIGHTS
from moec.models import BlockMatch, ModelSource, find_moe_blocks
from moec.passes.calibration import CalibrationData, model_inputs

__all__ = ["EXPERT_TENSORS", "BlockStats", "CompressionState", "expert_outputs", "experts_to_keep"]

log = logging.getLogger(__name__)

EXPERT_TENSORS = EXPERT_WEIGHTS  # the block's tensors stacked per expert
MAX_STAT_TOKENS = 4096
BATCH_ROWS = 8


@dataclass
class BlockStats:
    """One block on the calibration tokens (at most ``max_tokens`` of them): inputs ``x`` and
    outputs ``y`` [N, H], and the routing.

    ``router_weights``/``router_chosen`` [N, R] are over the router's experts; ``weights``/
    ``chosen`` [N, E] over the stored experts (after the block's ``expert_map``).
    """

    x: torch.Tensor
    y: torch.Tensor
    router_weights: torch.Tensor
    router_chosen: torch.Tensor
    weights: torch.Tensor
    chosen: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.x.shape[0])

    @property
    def frequency(self) -> torch.Tensor:
        """[E] fraction of tokens each stored expert serves."""
        return self.chosen.float().mean(0)

    @property
    def gate_mass(self) -> torch.Tensor:
        """[E] mean combine weight each stored expert gets per token."""
        return self.weights.sum(0) / max(self.tokens, 1)


def experts_to_keep(keep: float | int, experts: int, option: str, block: str) -> int:
    """KEEP as a count of experts: a fraction in (0, 1] (a float) or a count (an int)."""
    where = f"{option} {keep!r} for block {block or '(the model)'} of {experts} experts"
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise MoecError(f"{where}: KEEP must be a fraction in (0, 1] or a count of experts")
    if experts < 2:
        raise MoecError(f"{where}: a block with one expert has nothing to merge or prune")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise MoecError(f"{where}: a fraction must be in (0, 1]")
        return max(1, round(keep * experts))
    if not 1 <= keep <= experts:
        raise MoecError(f"{where}: a count must be between 1 and {experts}")
    return keep


def ridge_least_squares(
    features: torch.Tensor, target: torch.Tensor, ridge: float = 1e-4
) -> torch.Tensor:
    """argmin_W |features @ W - target|^2 + ridge * mean(diag(features^T features)) |W|^2,
    in float64: [N, F], [N, H] -> [F, H]."""
    features, target = features.double(), target.double()
    gram = features.T @ features
    scale = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + scale * eye, features.T @ target)


def expert_outputs(spec: MoESpec, weights: MoEWeights, x: torch.Tensor) -> torch.Tensor:
    """[E, N, H]: every stored expert on every row of ``x`` [N, H]."""
    with torch.no_grad():
        return torch.stack([expert_ffn(spec, weights, e, x) for e in range(spec.num_experts)])


def _not_compressible(match: BlockMatch) -> str | None:
    """Why the lossy passes leave a block alone (None: they may compress it)."""
    if match.expert_modules is not None or match.conversion.stand_in is not None:
        return "its experts are modules, not FFNs"
    if match.spec.gate_on_input:
        return "its routing weights scale its experts' inputs; merging assumes their outputs"
    return None


class CompressionState:
    """The source model with op blocks in place; ``blocks`` maps a block's path to its module."""

    def __init__(self, source: ModelSource, calibration: CalibrationData):
        model = copy.deepcopy(source.model)  # the user's model is left as it was
        matches = find_moe_blocks(model)
        self.skipped = {m.name: why for m in matches if (why := _not_compressible(m))}
        matches = [m for m in matches if m.name not in self.skipped]
        root = swap_blocks(model, matches)
        self.source = dataclasses.replace(source, model=root)
        self.calibration = calibration
        self.blocks: dict[str, nn.Module] = {
            m.name: root if m.name == "" else root.get_submodule(m.name) for m in matches
        }
        self.reference = copy.deepcopy(root)  # the model before any lossy pass, for the report
        self._stats: dict[int, dict[str, BlockStats]] = {}

    @property
    def model(self) -> nn.Module:
        return self.source.model

    def moe(self, name: str) -> tuple[MoESpec, MoEWeights]:
        block = self.blocks[name]
        if not isinstance(block, MoEBlock):
            raise TypeError(f"block {name} is no longer an MoE block")
        return block.to_moe()

    def problems(self) -> list[str]:
        """The IR check: every MoE block's weights have the shapes its spec implies."""
        found = []
        for name in self.moe_blocks():
            spec, weights = self.moe(name)
            try:
                weights.check(spec)
            except MoecError as e:
                found.append(f"block {name or '(model)'}: {e}")
        return found

    def moe_blocks(self) -> list[str]:
        """Paths of the blocks that are still MoE blocks."""
        return [name for name, b in self.blocks.items() if isinstance(b, MoEBlock)]

    def replace(self, name: str, module: nn.Module) -> None:
        """Put ``module`` in place of block ``name`` (statistics are collected again)."""
        if name == "":
            self.source = dataclasses.replace(self.source, model=module)
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), attr, module)
        self.blocks[name] = module
        self._stats = {}

    def stats(self, max_tokens: int = MAX_STAT_TOKENS) -> dict[str, BlockStats]:
        """Per MoE block, its statistics on the first ``max_tokens`` calibration tokens."""
        if max_tokens not in self._stats:
            self._stats[max_tokens] = self._collect(max_tokens)
        return self._stats[max_tokens]

    def _collect(self, max_tokens: int) -> dict[str, BlockStats]:
        names = self.moe_blocks()
        found: dict[str, list[tuple]] = {name: [] for name in names}

        def seen(name: str) -> int:
            return sum(len(r[0]) for r in found[name])

        def hook(name: str):
            def record(module, args, kwargs, output):
                if seen(name) < max_tokens:
                    found[name].append(_routing_of_call(module, args, kwargs, output))

            return record

        handles = [self.blocks[n].register_forward_hook(hook(n), with_kwargs=True) for n in names]
        try:
            with torch.no_grad():
                for start in range(0, len(self.calibration.fit), BATCH_ROWS):
                    rows = self.calibration.fit[start : start + BATCH_ROWS]
                    self.model(*model_inputs(self.source, rows))
                    if all(seen(n) >= max_tokens for n in names):
                        break
        finally:
            for h in handles:
                h.remove()
        stats = {}
        for name in names:
            if not found[name]:
                log.warning("block %s did not run on the calibration data", name)
                continue
            parts = [torch.cat(p)[:max_tokens] for p in zip(*found[name], strict=True)]
            stats[name] = BlockStats(*parts)
        return stats


def _routing_of_call(block: MoEBlock, args: tuple, kwargs: dict, output) -> tuple:
    """(x [T, H], y [T, H], router weights, router chosen, weights, chosen) of one call."""
    spec = block.spec
    x, ids, gates = experts_call_args(args, kwargs)
    if spec.routing == "external":
        router_w, router_c = scatter_routing(spec, ids, gates)
    else:
        x3 = x if x.dim() == 3 else x.unsqueeze(0)
        logits = router_logits(x3, block.router_weight, block.router_bias)
        router_w, router_c = route(spec, logits, block.selection_bias)
    weights, chosen = map_experts(spec, router_w, router_c)
    tensors = (x.float(), output.float(), router_w, router_c, weights, chosen)
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    return tuple(flat)
