"""`StagedOrtRunner`: an ONNX artifact run a stage (a layer or a few) at a time, each stage's
weights in memory only while it runs: how `moec verify` checks a model bigger than memory.

The graph is cut in its (topological) node order where the module path the exporter recorded
on each node (``pkg.torch.onnx.name_scopes``) enters the next entry of a ModuleList (the next
decoder layer); adjacent stages are merged while their weights fit the byte budget. Each stage
is a model of its own whose initializers still point into the artifact's external data files,
so a stage's session reads only its weights. The values that cross a cut are kept between
stages, and dropped after the last stage that reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moec.errors import ArtifactError
from moec.runtime.manifest import Manifest
from moec.runtime.ort_runner import OrtRunner, check_external_data, session_options

__all__ = ["STAGE_BYTES", "StagedOrtRunner"]

STAGE_BYTES = 256 << 20  # stages are merged while their weights stay under this
SCOPES = "pkg.torch.onnx.name_scopes"
LIST_ENTRY = re.compile(r"'([^']*\.\d+)'")  # the first scope that is a ModuleList's entry
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


@dataclass
class Stage:
    model: bytes  # a serialized ModelProto whose external data lies in the artifact directory
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int
    drop: list[str] = field(default_factory=list)  # values no later stage reads


class StagedOrtRunner(OrtRunner):
    """`OrtRunner` whose ``infer`` runs the graph stage by stage (one session at a time);
    ``stage_bytes``: the budget adjacent stages are merged under."""

    def __init__(self, manifest: Manifest, directory: Path, stage_bytes: int | None = None, **kw):
        super().__init__(manifest, directory, **kw)
        self.stage_bytes = STAGE_BYTES if stage_bytes is None else stage_bytes
        self.stages: list[Stage] = []

    def activate_impl(self) -> None:
        import onnx_ir as ir

        path = self.directory / self.manifest.files["model"].path
        check_external_data(path, {f.path for f in self.manifest.files.values()})
        try:
            model = ir.load(path)  # external data stays on disk
        except Exception as e:  # onnx-ir raises protobuf's and its own errors
            raise ArtifactError(f"{path} is not a readable ONNX model ({e})") from e
        self.stages = plan_stages(model, self.stage_bytes)
        self.output_names = [v.name for v in model.graph.outputs]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        options = session_options(self.intra_op_threads)
        options.add_session_config_entry(EXTERNAL_FOLDER, str(self.directory))
        options.add_session_config_entry("session.disable_prepacking", "1")  # no second copy
        values: dict[str, np.ndarray] = dict(feeds)
        for i, stage in enumerate(self.stages):
            try:
                session = ort.InferenceSession(stage.model, options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
                raise ArtifactError(f"ONNX Runtime cannot load stage {i} of the graph: {e}") from e
            outs = session.run(stage.outputs, {n: values[n] for n in stage.inputs})
            del session  # its weights go before the next stage's come
            values.update(zip(stage.outputs, outs, strict=True))
            for name in stage.drop:
                values.pop(name, None)
        return {name: values[name] for name in self.output_names}

    def decode_steps(self, batch: int, total: int):
        self.activate()
        return self.infer

    def deactivate_impl(self) -> None:
        self.stages = []


def plan_stages(model, stage_bytes: int) -> list[Stage]:
    """The graph of ``model`` (onnx-ir) cut into stages (see the module docstring)."""
    groups = _merged(_layer_runs(model), stage_bytes)
    reads = [_outside_inputs(nodes) for nodes in groups]
    read_later = {v.name for v in model.graph.outputs}
    handed_on = []
    for nodes, inputs in zip(reversed(groups), reversed(reads), strict=True):
        handed_on.append([o for n in nodes for o in n.outputs if o.name in read_later])
        read_later |= set(inputs)
    handed_on.reverse()
    stages = []
    for i, (nodes, inputs, outputs) in enumerate(zip(groups, reads, handed_on, strict=True)):
        later = {name for r in reads[i + 1 :] for name in r} | {v.name for v in model.graph.outputs}
        stage = _stage(model, nodes, list(inputs.values()), outputs, i)
        stage.drop = [name for name in inputs if name not in later]
        stages.append(stage)
    return stages


def _layer_runs(model) -> list[list]:
    """The nodes in order, cut where a node belongs to another ModuleList entry than the
    last one seen (nodes outside every entry join the run they are in)."""
    runs: list[list] = [[]]
    current = None
    for node in model.graph:
        found = LIST_ENTRY.search(node.metadata_props.get(SCOPES, ""))
        entry = found.group(1) if found else None
        if entry is not None and current is not None and entry != current and runs[-1]:
            runs.append([])
        if entry is not None:
            current = entry
        runs[-1].append(node)
    return runs


def _merged(runs: list[list], stage_bytes: int) -> list[list]:
    groups: list[list] = []
    size = 0
    for run in runs:
        run_size = _weight_bytes(run)
        if groups and size + run_size <= stage_bytes:
            groups[-1].extend(run)
            size += run_size
        else:
            groups.append(list(run))
            size = run_size
    return groups


def _weight_bytes(nodes) -> int:
    return sum(v.const_value.nbytes for v in _initializers(nodes))


def _initializers(nodes) -> list:
    seen: dict[int, object] = {}
    for value in _read_values(nodes):
        if value.is_initializer() and value.const_value is not None:
            seen[id(value)] = value
    return list(seen.values())


def _read_values(nodes):
    """Every value the nodes read, those their subgraphs read from outside included."""
    import onnx_ir as ir

    for node in nodes:
        yield from (v for v in node.inputs if v is not None)
        for attr in node.attributes.values():
            graphs = []
            if attr.type == ir.AttributeType.GRAPH:
                graphs = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                graphs = list(attr.value)
            for graph in graphs:
                inner = {id(v) for v in graph.inputs}
                for inner_node in ir.traversal.RecursiveGraphIterator(graph):
                    inner.update(id(o) for o in inner_node.outputs)
                for inner_node in ir.traversal.RecursiveGraphIterator(graph):
                    yield from (
                        v for v in inner_node.inputs if v is not None and id(v) not in inner
                    )


def _outside_inputs(nodes) -> dict:
    """name -> value of what the nodes read that they do not make and is not a weight."""
    produced = {id(o) for n in nodes for o in n.outputs}
    inputs: dict[str, object] = {}
    for value in _read_values(nodes):
        if id(value) not in produced and not value.is_initializer():
            inputs.setdefault(value.name, value)
    return inputs


def _stage(model, nodes: list, inputs: list, outputs: list, index: int) -> Stage:
    import onnx
    import onnx_ir as ir

    initializers = _initializers(nodes)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        f"stage_{index}",
        [_value_info(v) for v in inputs],
        [_value_info(v) for v in outputs],
        initializer=[ir.serde.serialize_tensor(v.const_value) for v in initializers],
    )
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return Stage(
        proto.SerializeToString(),
        [v.name for v in inputs],
        [o.name for o in outputs],
        sum(v.const_value.nbytes for v in initializers),
    )


def _value_info(value):
    """A value's name and element type (its shape is left for ONNX Runtime to infer)."""
    import onnx

    if value.dtype is None:
        return onnx.helper.make_empty_tensor_value_info(value.name)
    return onnx.helper.make_tensor_value_info(value.name, int(value.dtype), None)
