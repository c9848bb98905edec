"""``verify(OUT)``: run an artifact and the eager model it came from on the same seeded inputs.

The eager model is rebuilt from the source the manifest recorded (its weights' sha256 must
match). Inputs are drawn per shape from the manifest's input specs: several values of the dynamic
dims, batch 1 and sequence 1 included. The eager routing of every MoE block is recomputed from
the block's actual input with the IR's routing (float32, as the families do) and compared with
the artifact's routing outputs. The eager reference of an ONNX artifact breaks top-k ties as
ONNX's TopK does (`OnnxTopkTies`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moec import registry
from moec.compiler.sources import reload_source, weights_sha256
from moec.decode_verification import verify_decoding
from moec.eager_routing import (
    eager_routing_hooks,
    external_blocks,
    mark_flips,
    perturbed_routings,
    routing_keys,
)
from moec.errors import RuntimeUnavailableError, UsageError, VerificationError
from moec.models import BlockMatch, find_moe_blocks
from moec.models.block_calls import recorded_block_calls
from moec.models.hf_models import hf_model_source, is_hf_model
from moec.models.kv_cache import CausalLMWithCache, TinyLMWithCache, cache_model
from moec.models.layer_streaming import stream_layers
from moec.models.lazy_weights import has_lazy_weights, recording
from moec.onnx_tie_order import OnnxTopkTies
from moec.passes.compress import apply_compressed
from moec.runtime.arrays import to_numpy, to_torch
from moec.runtime.compare import OutputStats, RoutingStats, VerifyReport
from moec.runtime.inputs import dim_values, make_inputs
from moec.runtime.load import load
from moec.runtime.manifest import Manifest
from moec.runtime.memory import available_memory
from moec.runtime.runner import check_feeds
from moec.runtime.staged_ort_runner import StagedOrtRunner

__all__ = [
    "DEFAULT_DIM_SCHEDULE",
    "TOLERANCES",
    "eager_input",
    "eager_model",
    "verify",
]

# Values of the first, second, ... dynamic dim per input set (clipped to each dim's range).
# A causal LM's third dim is its past: empty, then 5 and 3 tokens.
DEFAULT_DIM_SCHEDULE = ((1, 1, 0), (1, 13, 0), (2, 8, 5), (4, 32, 3))
# By the artifact's output dtype: (relative L2 an output must reach, routing agreement a block
# must reach, the reference margin under which a token is a near-tie and may flip). moec's
# own: an artifact does not choose what it is judged by (only the user, by flags).
TOLERANCES = {
    "float64": (1e-9, 0.999, 1e-4),
    "float32": (1e-5, 0.999, 1e-4),
    "float16": (2e-2, 0.99, 2e-3),
    "bfloat16": (5e-2, 0.99, 2e-2),
}


def verify(
    path: str | Path,
    *,
    source: str | nn.Module | None = None,
    schedule: tuple[tuple[int, ...], ...] = DEFAULT_DIM_SCHEDULE,
    seed: int = 0,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    trust_source: bool = False,
    rel_l2: float | None = None,
    agreement: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    by_layers: bool | None = None,
) -> VerifyReport:
    """Compare the artifact at ``path`` with its eager source; truthy when within tolerance.

    ``source`` overrides the recorded source: a SRC string, or the nn.Module for artifacts
    compiled from an in-memory model. The ``trust_*`` flags are the user's consent to code
    the source or artifact would run (`eager_model`); the manifest cannot give it. Tolerances
    are `TOLERANCES` by each output's dtype, or ``rel_l2`` and ``agreement`` when given;
    ``atol``/``rtol`` check every element instead (``|out - ref| <= atol + rtol * |ref|``).
    ``inputs`` (name -> array): verify on these feeds instead of seeded random ones of the
    ``schedule``'s shapes. ``by_layers``: run an ONNX artifact a stage at a time
    (`StagedOrtRunner`), its weights never all in memory; None: when they would take more
    than half of the memory this process may still use (`available_memory`).
    """
    manifest = Manifest.read(path)
    trust = {"trust_pickle": trust_pickle, "trust_remote_code": trust_remote_code}
    model = eager_model(manifest, source, **trust, trust_source=trust_source)
    if manifest.compression:  # a lossy artifact is checked against its passes' output
        model = apply_compressed(model, manifest.compression, Path(path))
    notes = []
    unlisted = manifest.unlisted_files(Path(path))
    if unlisted:
        notes.append(f"files the manifest does not list (never checked nor read): {unlisted}")
    # the eager reference of an ONNX artifact breaks top-k ties as ONNX does (the same call)
    ties = OnnxTopkTies() if _runs_onnx(manifest) else nullcontext()
    with _runner(manifest, Path(path), by_layers, trust_pickle, notes) as runner, ties:
        sets = _input_sets(runner, inputs, schedule, seed, notes)
        first = _eager_inputs(model, manifest, sets[0][0])
        # a streamed model's blocks: their weights as recipes; blocks read from a call: this one
        with recording(), recorded_block_calls(model, tuple(first)):
            blocks = {m.name: m for m in find_moe_blocks(model)}
        outputs = [
            OutputStats(
                o.name, rel_l2 if rel_l2 is not None else _tolerance(o.dtype)[0], atol, rtol
            )
            for o in manifest.model_outputs
        ]
        loosest = max((_tolerance(o.dtype) for o in manifest.main_outputs), key=lambda t: t[0])
        least = agreement if agreement is not None else loosest[1]
        routing_specs = [o for o in manifest.outputs if o.role == "routing"]
        routing = [
            RoutingStats(key, o.name, least, near_tie=loosest[2])
            for o, key in zip(routing_specs, routing_keys(routing_specs), strict=True)
            if o.block in blocks
        ]
        if blocks and not routing_specs:
            notes.append(
                "the artifact has no routing outputs (--no-routing-outputs): its routing is not "
                "compared, only its outputs"
            )
        if len(routing) < len(routing_specs):
            notes.append("some blocks have no eager counterpart; their routing is not compared")
        report = VerifyReport(outputs, routing, notes=notes)
        for feeds, attended in sets:
            report.shapes.append({k: list(v.shape) for k, v in feeds.items()})
            report.dims.append(dim_values(manifest.inputs, feeds))
            ref_outputs, ref_routing = _run_eager(model, manifest, blocks, feeds)
            _mark_fragile_external_routing(model, manifest, blocks, feeds, ref_routing)
            outs = runner.infer(feeds)
            for stats, ref in zip(outputs, ref_outputs, strict=True):
                stats.update(_on(attended, ref), _on(attended, outs[stats.name]))
            for stats in routing:
                chosen, margin = ref_routing[stats.block]
                stats.update(
                    _on(attended, chosen), _on(attended, outs[stats.output]), _on(attended, margin)
                )
        if runner.decoding is not None and isinstance(model, (CausalLMWithCache, TinyLMWithCache)):
            logits_tolerance = next(o.tolerance for o in outputs if o.name == "logits")
            report.decode = verify_decoding(
                runner, model, blocks, routing_specs, logits_tolerance, least, loosest[2], seed
            )
    return report


def _runs_onnx(manifest: Manifest) -> bool:
    return manifest.files["model"].path.endswith(".onnx")


def _runner(manifest: Manifest, path: Path, by_layers, trust_pickle: bool, notes: list[str]):
    """The artifact's runner: by layers when asked, or when its weights take more than half
    of the memory this process may still use."""
    onnx = _runs_onnx(manifest)
    if by_layers and not onnx:
        raise UsageError(f"--by-layers runs ONNX artifacts; {path} is a {manifest.target} one")
    if by_layers is None:
        by_layers = onnx and manifest.deployable_bytes > available_memory() // 2
    if not by_layers:
        try:
            return load(path, trust_pickle=trust_pickle)
        except RuntimeUnavailableError as e:
            return _portable_runner(manifest, path, e, notes)
    runner = StagedOrtRunner(manifest, path).activate()
    notes.append(
        f"the artifact ran by layers ({len(runner.stages)} stage(s) of at most "
        f"{max(s.weight_bytes for s in runner.stages) / 1e9:.2f} GB of weights): its weights "
        "were never all in memory"
    )
    return runner


def _portable_runner(manifest: Manifest, path: Path, why: Exception, notes: list[str]):
    """The runner of a target's portable files (a TensorRT artifact's ONNX, on ONNX Runtime)
    when its own runtime cannot run here."""
    portable = registry.target(manifest.target).options.get("portable_runner")
    if portable is None:
        raise why
    if "bfloat16" in {o.dtype for o in manifest.outputs}:
        raise UsageError(
            f"{why}. Its ONNX is bfloat16, which ONNX Runtime's CPU kernels do not run, so it "
            "can be verified only where its engine runs"
        ) from why
    notes.append(f"{why}. Its ONNX ran on ONNX Runtime instead; no engine was verified")
    return registry.resolve(portable)(manifest, path).activate()


def _input_sets(runner, inputs, schedule, seed: int, notes: list[str]) -> list[tuple]:
    """(feeds, attended tokens or None) to verify on: the user's ``inputs`` (completed and
    checked by the runner), else seeded random ones of the ``schedule`` and a padded batch."""
    specs = runner.manifest.inputs
    if inputs is not None:
        notes.append("verified on the given inputs only (no random shapes, no padded batch)")
        return [(check_feeds(specs, runner.completed(dict(inputs))), None)]
    sets = [(feeds, None) for feeds in make_inputs(specs, schedule, seed)]
    padded = _padded_inputs(runner.manifest, seed)
    if padded is not None:
        sets.append(padded)
        notes.append(
            f"the last input set is left-padded ({PADDING} tokens of row 1 masked); its "
            "outputs are compared on the attended tokens"
        )
    return sets


PADDED = (2, 8, 5)  # dims of the left-padded input set (batch, sequence, decoder tokens)
PADDING = 3  # masked tokens at the start of its second row


def _padded_inputs(manifest: Manifest, seed: int) -> tuple[dict, np.ndarray] | None:
    """A left-padded batch for an artifact with an attention mask and no cache (whose
    decoding `verify_decoding` checks padded), and the tokens it attends [batch, sequence]."""
    masks = [s for s in manifest.inputs if s.role == "mask"]
    if not masks or manifest.decoding:
        return None
    feeds = make_inputs(manifest.inputs, (PADDED,), seed + 1)[0]
    for spec in masks:
        feeds[spec.name][1, :PADDING] = 0
    return feeds, feeds[masks[0].name].astype(bool)


def _on(attended: np.ndarray | None, value: np.ndarray) -> np.ndarray:
    """``value``'s entries for the attended tokens, where it has one per token ([batch,
    sequence, ...] or [batch*sequence, ...]): a padded token's output is not defined."""
    if attended is None or value.ndim == 0:
        return value
    if value.shape[:2] == attended.shape:
        return value[attended]
    if value.shape[0] == attended.size:
        return value[attended.reshape(-1)]
    return value


def _tolerance(dtype: str) -> tuple[float, float, float]:
    """moec's tolerances for an output of ``dtype`` (integers and booleans: exact)."""
    return TOLERANCES.get(dtype, (0.0, 1.0, TOLERANCES["float32"][2]))


def eager_model(
    manifest: Manifest,
    source,
    *,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    trust_source: bool = False,
) -> nn.Module:
    """The eager model an artifact was compiled from (its weights' sha256 checked): ``source``
    (the user's), or the one its manifest records, rebuilt only as far as the user's trust
    flags allow (`reload_source`). A transformers checkpoint stays on disk: each layer reads
    its weights when it runs (`stream_layers`), unless lossy passes made the artifact (their
    reference is rebuilt in memory)."""
    if isinstance(source, nn.Module):
        if is_hf_model(source):
            source = hf_model_source(source.eval()).model
        model, digest = source.eval(), weights_sha256(source)
    else:
        loaded = reload_source(
            manifest.source,
            trust_pickle=trust_pickle,
            trust_remote_code=trust_remote_code,
            trust_source=trust_source,
            override=source,
            lazy_weights=not manifest.compression,
        )
        model, digest = loaded.model_source.model, loaded.sha256
        if digest != manifest.source.get("sha256") and manifest.source.get("kind") == "hf":
            model, digest = _hashed_as_before(manifest, trust_remote_code, source, model, digest)
        if has_lazy_weights(model):
            stream_layers(model)
    if digest != manifest.source.get("sha256"):
        named = source if isinstance(source, str) else manifest.source.get("spec")
        named = "the model given" if isinstance(source, nn.Module) else f"the source {named}"
        raise VerificationError(
            f"{named} is not the model this artifact was "
            "compiled from (the sha256 of its weights differs): recompile the artifact, or pass "
            "the original model as the source"
        )
    cached = cache_model(model) if manifest.decoding else None
    return model if cached is None else cached


def _hashed_as_before(manifest: Manifest, trust_remote_code: bool, source, model, digest):
    """An ``hf:`` artifact compiled before moec hashed checkpoint files recorded the sha256 of
    the model it built: rebuild it in memory and compare that instead."""
    loaded = reload_source(manifest.source, trust_remote_code=trust_remote_code, override=source)
    built = loaded.model_source.model
    if weights_sha256(built) == manifest.source.get("sha256"):
        return built, manifest.source["sha256"]
    return model, digest


def _mark_fragile_external_routing(model, manifest, blocks, feeds, routing) -> None:
    """Near-ties of routing the family's own router made (where moec knows no margin): the
    tokens whose choice flips when every such block's input gets `perturbed_blocks` noise."""
    external = external_blocks(blocks)
    if not external:
        return
    inputs = _eager_inputs(model, manifest, feeds)
    mark_flips(routing, perturbed_routings(model, external, lambda: model(*inputs)))


def _run_eager(
    model: nn.Module, manifest: Manifest, blocks: dict[str, BlockMatch], feeds: dict[str, Any]
) -> tuple[list[np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Main outputs, and per block (chosen [..., E], near-tie margin [...]) on its real input."""
    routing: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with eager_routing_hooks(blocks, routing), torch.no_grad():
        out = model(*_eager_inputs(model, manifest, feeds))
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [to_numpy(o.detach()) for o in outs], routing


def _eager_inputs(model: nn.Module, manifest: Manifest, feeds: dict[str, Any]) -> list:
    return [eager_input(model, to_torch(feeds[s.name])) for s in manifest.inputs]


def eager_input(model: nn.Module, value: torch.Tensor) -> torch.Tensor:
    """A feed as the eager source takes it: a reduced-precision artifact is checked against
    the source in its own precision, given the same values."""
    if not value.is_floating_point():
        return value
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), value.dtype)
    return value.to(dtype)
