"""NLLB-MoE's ``NllbMoeSparseMLP``: a top-2 router over a ModuleDict of ``fc1 -> act -> fc2``
experts.

At inference the router takes each token's two most probable experts (softmax in float32), and
weights them by their probabilities renormalised to sum 1: the IR's top-2 softmax with
``norm_topk_prob``. Experts scale their output by ``1 - moe_token_dropout`` at inference; the
factor folds into ``fc2``. Expert capacity at inference is ``ceil(fraction * tokens)`` of the
batch's tokens, which drops nothing while ``moe_eval_capacity_token_fraction >= 1`` (an expert
is chosen at most once per token); a smaller fraction drops the second choices of all tokens
before any first choice, an order moec's capacity does not have, and is refused, as are the
random second-expert policies. Padding tokens get no experts in NLLB; their outputs are not
defined, and without drops they change no other token.

The block's own forward is run once on random tokens against moec's kernel: a block whose
forward computes something else (transformers 5.x hands its experts the top-1 mask, so that
only experts 0 and 1 ever run: docs/upstream/nllb_moe.md) is refused with that reason.
"""

from __future__ import annotations

import torch
from torch import nn

from moec.errors import UnsupportedBlockError
from moec.ir import MoESpec, MoEWeights, moe_eager
from moec.models.conversion import Conversion
from moec.models.hf_experts import probe_plain_activation
from moec.models.lazy_weights import materialize, recipe_of

__all__ = ["NllbMoeAdapter"]

PROBE_TOKENS = 64


class NllbMoeAdapter:
    name = "hf-nllb-moe"

    def convert(self, module: nn.Module) -> Conversion | None:
        if type(module).__name__ != "NllbMoeSparseMLP":
            return None
        router = module.router
        experts = [module.experts[f"expert_{e}"] for e in range(router.num_experts)]
        _check_routing(router)
        keep = 1.0 - float(module.experts.moe_token_dropout)
        h, i = experts[0].fc1.in_features, experts[0].fc1.out_features
        spec = MoESpec(
            num_experts=router.num_experts,
            top_k=2,
            hidden_size=h,
            expert_size=i,
            norm_topk_prob=True,
            expert_kind="plain",
            activation=probe_plain_activation(experts[0].act, i),
        )
        bias = router.classifier.bias

        def stacked(get) -> torch.Tensor:
            return torch.stack([get(x).detach() for x in experts])

        weights = MoEWeights(
            router_weight=router.classifier.weight.detach().float(),
            router_bias=None if bias is None else bias.detach().float(),
            w_up=stacked(lambda x: x.fc1.weight),
            b_up=stacked(lambda x: x.fc1.bias),
            w_down=stacked(lambda x: x.fc2.weight) * keep,
            b_down=stacked(lambda x: x.fc2.bias) * keep,
        )
        _check_forward(module, spec, weights)
        return Conversion(spec, weights)


def _check_routing(router: nn.Module) -> None:
    if router.second_expert_policy != "all":
        raise UnsupportedBlockError(
            f"second_expert_policy={router.second_expert_policy!r} draws the second expert at "
            "random on every call; moec compiles the deterministic policy 'all'"
        )
    if router.moe_eval_capacity_token_fraction < 1.0:
        raise UnsupportedBlockError(
            f"moe_eval_capacity_token_fraction={router.moe_eval_capacity_token_fraction} drops "
            "routed tokens, all second choices before any first one; moec's capacity queues "
            "them by position: set it to 1.0 (no drops)"
        )


def _check_forward(module: nn.Module, spec: MoESpec, weights: MoEWeights) -> None:
    """The block's own forward on random tokens against moec's kernel on what was read."""
    g = torch.Generator().manual_seed(0)
    dtype = weights.w_down.dtype
    x = torch.randn(1, PROBE_TOKENS, spec.hidden_size, generator=g).to(dtype)
    state = {n: _real(t) for n, t in [*module.named_parameters(), *module.named_buffers()]}
    real = MoEWeights(**{n: None if t is None else _real(t) for n, t in vars(weights).items()})
    with torch.no_grad():
        theirs = torch.func.functional_call(module, state, (x,)).float()
        ours = moe_eager(spec, real, x)[0].float()
    error = float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))
    if not error <= (1e-5 if dtype == torch.float32 else 2e-2):
        raise UnsupportedBlockError(
            f"its forward is not NLLB-MoE's top-2 routing over its experts (rel. L2 {error:.1e} "
            "on random tokens); transformers 5.x hands NllbMoeExperts the top-1 mask, so only "
            "experts 0 and 1 run (docs/upstream/nllb_moe.md): moec does not compile that"
        )


def _real(tensor: torch.Tensor) -> torch.Tensor:
    """A weight's values: read from the checkpoint when it is one that stays on disk."""
    recipe = recipe_of(tensor) if tensor.is_meta else None
    return tensor if recipe is None else materialize(recipe)
