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
TOP = {  # what users call: compile, verify, benchmark, place; the CLI
    "pipeline", "verification", "decode_verification", "eager_routing", "onnx_tie_order",
    "benchmark", "placing", "placement_simulator", "placement_plot", "cli", "cli_common",
    "cli_progress", "cli_tensorrt", "__main__",
}  # fmt: skip
# what each unit may import besides itself (the runtime: only the IR and the base)
ALLOWED = {
    "base": {"base"},
    "ir": {"base"},
    "models": {"base", "ir"},
    "runtime": {"base", "ir"},
    "compiler": {"base", "ir", "models", "runtime"},
    "passes": {"base", "ir", "models", "runtime", "compiler"},
    "top": {"base", "ir", "models", "runtime", "compiler", "passes"},
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
        if isinstance(node, ast.ImportFrom) and node.level:
            found.add(f"<relative import in {path.name}>")  # the checks need absolute imports
        elif isinstance(node, ast.Import):
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
            if target.startswith("<"):
                wrong.append(f"{module}: {target[1:-1]}")
                continue
            other = unit_of(target)
            if other != unit and other not in ALLOWED[unit]:
                wrong.append(f"{module} ({unit}) imports {target} ({other})")
    return wrong


def test_every_import_goes_down_the_layers():
    wrong = violations(import_graph())
    assert not wrong, "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among moec's modules (each as the path that closes it)."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            found.append([*path[path.index(module) :], module])
            return
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if other in graph:
                visit(other, [*path, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
    return found


def test_the_module_import_graph_is_acyclic():
    """No module imports (at any depth, in any function) one that imports it back."""
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_checker_sees_forbidden_imports(tmp_path):
    """The checks above can fail: the runtime importing the compiler, or ir importing models."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from moec.compiler import capture\nimport moec.passes.capacity\nfrom . import x\n"
    )
    assert imported_modules(probe) == {
        "moec.compiler.capture",
        "moec.passes.capacity",
        "<relative import in probe.py>",
    }
    graph = import_graph()
    graph["moec.runtime.probe"] = imported_modules(probe)
    graph["moec.ir.probe"] = {"moec.models.zoo"}
    assert violations(graph) == [
        "moec.runtime.probe: relative import in probe.py",
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
