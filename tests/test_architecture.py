"""The package import graph, read from the source with ast: ir <- models <- compiler <- passes
<- pipeline, the runtime importing only ir and the torch-free base modules, and no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import moec

ROOT = Path(moec.__file__).parent
BASE = {"errors", "registry", "settings", "timing"}  # torch-free modules everything may use
TOP = {"pipeline", "verification", "benchmark", "cli"}
LAYERS = {"base": 0, "ir": 1, "models": 2, "runtime": 2, "compiler": 3, "passes": 4, "top": 5}
# what each unit may import besides itself (the runtime: only the IR and the base)
ALLOWED = {
    "base": {"base"},
    "ir": {"base"},
    "models": {"base", "ir"},
    "runtime": {"base", "ir"},
    "compiler": {"base", "ir", "models", "runtime"},
    "passes": {"base", "ir", "models", "runtime", "compiler"},
    "top": set(LAYERS),
}


def unit_of(module: str) -> str:
    """The unit of a dotted moec module name: a subpackage, ``base`` or ``top``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # the moec package itself: __version__ and lazy names, no imports
    first = parts[1]
    if first in BASE:
        return "base"
    if first in TOP:
        return "top"
    return first


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every moec module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moec")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moec"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_path = ROOT.parent / candidate.replace(".", "/")
                is_module = as_path.with_suffix(".py").exists() or as_path.is_dir()
                found.add(candidate if is_module else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(ROOT.rglob("*.py"))}


def violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imports in graph.items():
        unit = unit_of(module)
        for target in sorted(imports):
            other = unit_of(target)
            if other != unit and other not in ALLOWED[unit]:
                wrong.append(f"{module} ({unit}) imports {target} ({other})")
    return wrong


def test_every_import_goes_down_the_layers():
    wrong = violations(import_graph())
    assert not wrong, "\n".join(wrong)


def test_the_unit_graph_is_acyclic():
    edges = {u: set() for u in LAYERS}
    for module, imports in import_graph().items():
        for target in imports:
            if unit_of(target) != unit_of(module):
                edges[unit_of(module)].add(unit_of(target))
    order, state = [], {}

    def visit(unit: str, path: list[str]) -> None:
        if state.get(unit) == "done":
            return
        assert state.get(unit) != "open", f"import cycle: {' -> '.join([*path, unit])}"
        state[unit] = "open"
        for other in sorted(edges[unit]):
            visit(other, [*path, unit])
        state[unit] = "done"
        order.append(unit)

    for unit in LAYERS:
        visit(unit, [])
    assert order.index("ir") < order.index("compiler") < order.index("passes")


def test_the_checker_sees_forbidden_imports(tmp_path):
    """The checks above can fail: the runtime importing the compiler, or ir importing models."""
    probe = tmp_path / "probe.py"
    probe.write_text("from moec.compiler import capture\nimport moec.passes.capacity\n")
    assert imported_modules(probe) == {"moec.compiler.capture", "moec.passes.capacity"}
    graph = import_graph()
    graph["moec.runtime.probe"] = imported_modules(probe)
    graph["moec.ir.probe"] = {"moec.models.zoo"}
    assert violations(graph) == [
        "moec.runtime.probe (runtime) imports moec.compiler.capture (compiler)",
        "moec.runtime.probe (runtime) imports moec.passes.capacity (passes)",
        "moec.ir.probe (ir) imports moec.models.zoo (models)",
    ]


@pytest.mark.parametrize(
    "code",
    [
        "import moec.cli, moec.settings, moec.registry",
        "import moec.runtime.load, moec.runtime.ort_runner, moec.ir.signature",
    ],
    ids=["cli", "onnx-runtime"],
)
def test_torch_free_modules_import_no_torch(code):
    """``moec --help`` and a deployed ONNX artifact's runtime need no torch."""
    check = f"{code}; import sys; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0


def test_every_package_states_its_public_names():
    missing = [
        str(p.relative_to(ROOT.parent))
        for p in sorted(ROOT.rglob("__init__.py"))
        if "__all__" not in p.read_text()
    ]
    assert not missing
