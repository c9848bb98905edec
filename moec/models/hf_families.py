"""Adapters for transformers families whose experts are not a ``@use_experts_implementation``
module, recognised by class because their routing or expert calls need family knowledge.

- DBRX: ``DbrxExperts`` keeps experts as [E*I, H] matrices (w1 gate, v1 up, w2 down); its router
  (softmax, top-k, p-norm) stays in the graph.
- SwitchTransformers: ``SwitchTransformersSparseMLP``: top-1 softmax in the router dtype, each
  expert takes at most ``expert_capacity`` tokens per sequence in position order; the dropped
  tokens get nothing. Experts are a ModuleDict of ``wi -> act -> wo``.
- JetMoE: ``JetMoeMoE`` (top-k of the logits then softmax over them, experts as
  ``JetMoeParallelExperts``, a block output bias), and the attention experts ``JetMoeMoA``,
  whose per-expert query and output projections run inside attention (map before it, reduce
  after it); they are replaced by an exportable stand-in with the same map/reduce interface that
  gathers each expert's tokens, projects them and scatters them back.
"""

from __future__ import annotations

import torch
from torch import nn

from moec.ir import MoESpec, MoEWeights, route, router_logits
from moec.models.conversion import Conversion
from moec.models.hf_experts import probe_plain_activation

__all__ = ["DbrxExpertsAdapter", "JetMoeAdapter", "SwitchSparseMLPAdapter"]


def _class_is(module: nn.Module, name: str) -> bool:
    return type(module).__name__ == name


class DbrxExpertsAdapter:
    name = "hf-dbrx"

    def convert(self, module: nn.Module) -> Conversion | None:
        if not _class_is(module, "DbrxExperts"):
            return None
        mlp = module.mlp
        e, i, h = module.num_experts, module.ffn_hidden_size, module.hidden_size

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.detach().view(e, i, h)

        spec = MoESpec(
            num_experts=e,
            top_k=1,  # the router's output shape decides; see lower_moe_fused
            hidden_size=h,
            expert_size=i,
            routing="external",
            activation=probe_plain_activation(mlp.activation_fn, i),
        )
        weights = MoEWeights(
            router_weight=None,
            w_gate=split(mlp.w1),
            w_up=split(mlp.v1),
            w_down=split(mlp.w2).transpose(1, 2),
        )
        return Conversion(spec, weights)


class SwitchSparseMLPAdapter:
    name = "hf-switch"

    def convert(self, module: nn.Module) -> Conversion | None:
        if not _class_is(module, "SwitchTransformersSparseMLP"):
            return None
        router, experts = module.router, [module.experts[k] for k in module.experts]
        h, i = experts[0].wi.in_features, experts[0].wi.out_features
        spec = MoESpec(
            num_experts=router.num_experts,
            top_k=1,
            hidden_size=h,
            expert_size=i,
            expert_capacity=router.expert_capacity,
            capacity_scope="sequence",
            expert_kind="plain",
            activation=probe_plain_activation(experts[0].act, i),
        )
        bias = router.classifier.bias
        weights = MoEWeights(
            router_weight=router.classifier.weight.detach(),
            router_bias=None if bias is None else bias.detach(),
            w_up=torch.stack([x.wi.weight.detach() for x in experts]),
            w_down=torch.stack([x.wo.weight.detach() for x in experts]),
        )
        return Conversion(spec, weights)


class JetMoeAdapter:
    name = "hf-jetmoe"

    def convert(self, module: nn.Module) -> Conversion | None:
        if _class_is(module, "JetMoeMoE"):
            gate, up = module.input_linear.weight.detach().chunk(2, dim=1)
            spec = MoESpec(
                num_experts=module.router.num_experts,
                top_k=module.router.top_k,
                hidden_size=module.input_size,
                expert_size=module.hidden_size,
                topk_before_softmax=True,
                activation=probe_plain_activation(module.activation, module.hidden_size),
            )
            weights = MoEWeights(
                router_weight=module.router.layer.weight.detach(),
                w_gate=gate,
                w_up=up,
                w_down=module.output_linear.weight.detach(),
                output_bias=module.bias.detach(),
            )
            return Conversion(spec, weights)
        if _class_is(module, "JetMoeMoA"):
            spec = MoESpec(
                num_experts=module.num_experts,
                top_k=module.top_k,
                hidden_size=module.input_size,
                expert_size=module.hidden_size,
                topk_before_softmax=True,
                expert_kind="module",
            )
            weights = MoEWeights(
                router_weight=module.router.layer.weight.detach(), w_up=None, w_down=None
            )
            return Conversion(
                spec,
                weights,
                stand_in=lambda: AttentionExpertsStandIn(spec, module),
                routing_module=module.router,
            )
        return None


class AttentionExpertsStandIn(nn.Module):
    """Exportable JetMoeMoA: ``map`` projects each (token, slot) with its expert's query
    projection; ``reduce`` applies the expert's output projection and the gates, sums the slots
    and adds the bias. Each expert runs on its own (token, slot) pairs only."""

    def __init__(self, spec: MoESpec, moa: nn.Module):
        super().__init__()
        self.spec = spec
        self.router_weight = moa.router.layer.weight
        self.input_weight = moa.input_linear.weight  # [E, D, H]
        self.output_weight = moa.output_linear.weight  # [E, H, D]
        self.bias = moa.bias
        self.routing_sink: list[torch.Tensor] | None = None

    def map(self, layer_input: torch.Tensor):
        b, s, h = layer_input.shape
        x = layer_input.reshape(-1, h)
        logits = router_logits(x, self.router_weight, None)
        gates, ids = logits.topk(self.spec.top_k, dim=-1)
        gates = gates.softmax(dim=-1).to(x.dtype)  # [T, k]
        _, chosen = route(self.spec, logits)
        if self.routing_sink is not None:
            self.routing_sink.append(chosen.reshape(b, s, -1))
        flat_ids = ids.reshape(-1)  # one row per (token, slot)
        rows = x.repeat_interleave(self.spec.top_k, dim=0)
        queries = torch.zeros(rows.shape[0], self.input_weight.shape[1], dtype=x.dtype)
        for e in range(self.spec.num_experts):
            pairs = (flat_ids == e).nonzero().squeeze(-1)
            queries = queries.index_put((pairs,), rows[pairs] @ self.input_weight[e].T)
        topo = (flat_ids, gates.reshape(-1))
        return queries.view(b, s, self.spec.top_k, -1), logits, topo

    def reduce(self, layer_input: torch.Tensor, topo):
        b, s, k, d = layer_input.shape
        flat_ids, gates = topo
        rows = layer_input.reshape(-1, d)
        out = torch.zeros(rows.shape[0], self.output_weight.shape[1], dtype=rows.dtype)
        for e in range(self.spec.num_experts):
            pairs = (flat_ids == e).nonzero().squeeze(-1)
            projected = rows[pairs] @ self.output_weight[e].T * gates[pairs, None]
            out = out.index_put((pairs,), projected)
        return out.view(b, s, k, -1).sum(dim=2) + self.bias
