"""``--no-routing-outputs``: the captured program without its per-block routing masks.

Capture makes every MoE block's routing an output so that verification can compare it wherever
the artifact runs; a deployment that never reads them can leave them out. The masks' graph
outputs, their entries in the program's signature and its output pytree go; the routing
computations feeding nothing else are then dead code, which the lowerings drop."""

from __future__ import annotations

from torch.export.graph_signature import OutputKind
from torch.utils import _pytree as pytree

from moec.ir.program import CapturedProgram

__all__ = ["drop_routing_outputs"]


def drop_routing_outputs(captured: CapturedProgram) -> CapturedProgram:
    """``captured`` with only its model outputs (edited in place)."""
    keep = [i for i, spec in enumerate(captured.outputs) if spec.role != "routing"]
    program = captured.program
    specs = program.graph_signature.output_specs
    users = [i for i, spec in enumerate(specs) if spec.kind == OutputKind.USER_OUTPUT]
    dropped = {position for i, position in enumerate(users) if i not in keep}
    graph = program.graph_module.graph
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = (tuple(v for i, v in enumerate(output.args[0]) if i not in dropped),)
    specs[:] = [spec for i, spec in enumerate(specs) if i not in dropped]
    graph.eliminate_dead_code()
    program.graph_module.recompile()
    for entry in program.module_call_graph:
        if entry.fqn == "" and entry.signature is not None:  # the program's own call
            entry.signature.out_spec = pytree.tree_flatten(tuple(range(len(keep))))[1]
    captured.outputs = [captured.outputs[i] for i in keep]
    return captured
