"""The oracle: an MoE block as a plain loop over (token, expert) pairs in float64.

Written from the MoESpec semantics alone (no code shared with moec.ir), one token at a time.
"""

from __future__ import annotations

import math

import numpy as np

from moec.ir import MoESpec, MoEWeights


def _np(t):
    return None if t is None else t.detach().double().numpy()


def _act(name, v):
    if name == "silu":
        return v / (1 + np.exp(-v))
    if name == "relu":
        return np.maximum(v, 0)
    if name == "gelu":
        return np.array([0.5 * a * (1 + math.erf(a / math.sqrt(2))) for a in v])
    if name == "relu2":
        return np.maximum(v, 0) ** 2
    if name == "gelu_tanh":
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    raise AssertionError(name)


def _expert(spec, w, e, x):
    up = w["w_up"][e] @ x + (w["b_up"][e] if w["b_up"] is not None else 0)
    if spec.expert_kind == "plain":
        hidden = _act(spec.activation, up)
    else:
        gate = w["w_gate"][e] @ x + (w["b_gate"][e] if w["b_gate"] is not None else 0)
        if spec.activation == "swiglu":
            if spec.swiglu_limit is not None:
                gate = np.minimum(gate, spec.swiglu_limit)
                up = np.clip(up, -spec.swiglu_limit, spec.swiglu_limit)
            hidden = gate / (1 + np.exp(-spec.swiglu_alpha * gate)) * (up + spec.swiglu_beta)
        elif spec.activation == "swiglu_softcap":
            cg, cu = spec.gate_softcap, spec.up_softcap
            hidden = cg * np.tanh(gate / cg) / (1 + np.exp(-gate)) * cu * np.tanh(up / cu)
        elif spec.activation_limit is not None:
            limit = spec.activation_limit
            hidden = np.minimum(_act(spec.activation, gate), limit) * np.clip(up, -limit, limit)
        else:
            hidden = _act(spec.activation, gate) * up
    out = w["w_down"][e] @ hidden + (w["b_down"][e] if w["b_down"] is not None else 0)
    if spec.post_expert_norm_eps is None:
        return out
    out = out / np.sqrt(np.mean(out**2) + spec.post_expert_norm_eps)
    return out * (w["post_norm_weight"][e] if w["post_norm_weight"] is not None else 1)


def _shared(spec, w, x):
    if not spec.shared_expert_size:
        return 0.0
    y = w["shared_down"] @ (
        _act(spec.shared_activation, w["shared_gate"] @ x) * (w["shared_up"] @ x)
    )
    if spec.shared_expert_gated:
        y = y / (1 + np.exp(-(w["shared_expert_gate"] @ x)[0]))
    return y


def _softmax(v):
    z = np.exp(v - v.max())
    return z / z.sum()


def _token_choice(spec, w, x):
    """[(expert, weight), ...] for one token, in slot order."""
    logits = w["router_weight"] @ x + (w["router_bias"] if w["router_bias"] is not None else 0)
    experts = range(spec.router_experts)
    if spec.score == "softmax":
        scores = _softmax(logits)
    elif spec.score == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = logits
    choice = logits.copy() if spec.topk_before_softmax else scores.copy()
    if w["selection_bias"] is not None:
        choice = choice + w["selection_bias"]
    allowed = set(experts)
    if spec.n_group > 1:
        per = spec.router_experts // spec.n_group
        group_score = []
        for g in range(spec.n_group):
            members = sorted(choice[g * per : (g + 1) * per], reverse=True)
            group_score.append(members[0] if spec.group_score == "max" else members[0] + members[1])
        best = sorted(range(spec.n_group), key=lambda g: -group_score[g])[: spec.topk_group]
        allowed = {e for e in experts if e // per in best}
    picked = sorted(allowed, key=lambda e: -choice[e])[: spec.top_k]
    if spec.topk_before_softmax:
        weights = _softmax(np.array([logits[e] for e in picked]))
    else:
        weights = np.array([scores[e] for e in picked])
        if spec.norm_topk_prob:
            weights = weights / weights.sum()
    return list(zip(picked, weights * spec.routed_scaling_factor, strict=True))


def oracle_moe(spec: MoESpec, weights: MoEWeights, x, routed=None) -> np.ndarray:
    """x: [B, S, H] tensor -> [B, S, H] float64. External routing takes ``routed``: (ids,
    weights) [B, S, k] tensors, one (expert, weight) pair per slot, a repeated expert included
    as often as it is repeated (transformers' loops add each slot's output)."""
    w = {k: _np(getattr(weights, k)) for k in weights.__dataclass_fields__}
    xs = x.detach().double().numpy()
    b, s, _ = xs.shape
    pairs = {}  # (b, t) -> [(expert, weight)]
    if spec.routing == "external":
        ids, gates = (t.detach().double().numpy() for t in routed)
        for bi in range(b):
            for t in range(s):
                pairs[(bi, t)] = list(zip(ids[bi, t].astype(int), gates[bi, t], strict=True))
    elif spec.routing == "expert_choice":
        cap = min(
            s, math.ceil((spec.capacity_factor or 1.0) * s * spec.top_k / spec.router_experts)
        )
        for bi in range(b):
            probs = [_softmax(w["router_weight"] @ xs[bi, t]) for t in range(s)]
            for e in range(spec.router_experts):
                for t in sorted(range(s), key=lambda t: -probs[t][e])[:cap]:
                    pairs.setdefault((bi, t), []).append((e, probs[t][e]))
    else:
        for bi in range(b):
            for t in range(s):
                pairs[(bi, t)] = _token_choice(spec, w, xs[bi, t])
        if spec.expert_capacity is not None or spec.capacity_factor is not None:
            scopes = [[(bi, t) for t in range(s)] for bi in range(b)]
            if spec.capacity_scope == "batch":
                scopes = [[(bi, t) for bi in range(b) for t in range(s)]]
            for scope in scopes:
                cap = spec.expert_capacity or math.ceil(
                    spec.capacity_factor * len(scope) * spec.top_k / spec.router_experts
                )
                served = [0] * spec.router_experts
                for key in scope:
                    kept = []
                    for e, weight in pairs[key]:
                        if served[e] < cap:
                            kept.append((e, weight))
                        served[e] += 1
                    pairs[key] = kept
    out = np.zeros_like(xs)
    for bi in range(b):
        for t in range(s):
            out[bi, t] = _shared(spec, w, xs[bi, t])
            if w["output_bias"] is not None:
                out[bi, t] += w["output_bias"]
    for (bi, t), chosen in pairs.items():
        for e, weight in chosen:
            stored = spec.expert_map[e] if spec.expert_map is not None else e
            if stored < 0:  # pruned: contributes nothing; merged experts share weights
                continue
            if spec.gate_on_input:  # the weight scales the expert's input (Llama 4)
                out[bi, t] += _expert(spec, w, stored, weight * xs[bi, t])
            else:
                out[bi, t] += weight * _expert(spec, w, stored, xs[bi, t])
    return out
