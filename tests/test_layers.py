"""The package's layers: every import points down, and no modules import each other in a cycle.

core < data < scoring < training < detection < segmentation < export < context < stages < orchestrate < auto < cli.
Library packages never reach the stages or the Context; jobs/ runs in another environment and imports nothing of the
pipeline.
Function-level imports count too: a lazy import is still an edge.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
LAYERS = ["core", "data", "scoring", "training", "detection", "segmentation", "export", "context", "stages",
          "orchestrate", "auto", "cli"]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself
    return "cli" if parts[1] == "__main__" else parts[1]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the pipeline modules it imports (anywhere in the file)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` is an edge to the module, `from mod import name` one to mod
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, edges in graph.items():
        layer = _layer(module)
        if layer is None:
            continue
        for target in edges:
            target_layer = _layer(target)
            if target_layer is None:
                continue
            if layer == "jobs" or target_layer == "jobs":
                bad.append(f"{module} -> {target} (jobs/ stands alone)")
            elif LAYERS.index(target_layer) > LAYERS.index(layer):
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_module_belongs_to_a_layer():
    stray = [m for m in import_graph() if _layer(m) not in (*LAYERS, "jobs", None)]
    assert stray == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path: Path):
    root = tmp_path / "pipeline"
    for sub in ("core", "stages"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "core" / "a.py").write_text("def f():\n    from pipeline.stages import b\n")
    (root / "stages" / "b.py").write_text("from pipeline.core.a import f\n")
    graph = import_graph(root)
    assert upward_imports(graph) == ["pipeline.core.a -> pipeline.stages.b"]
    assert cycles(graph) == [["pipeline.core.a", "pipeline.stages.b"]]


@pytest.mark.parametrize("package", ["core", "data", "scoring", "training", "detection", "segmentation", "export"])
def test_library_functions_do_not_take_the_context(package: str):
    """A library function's parameters never name the stage context (`ctx`)."""
    takes_ctx = []
    for path in (PACKAGE / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if any(a.arg == "ctx" for a in node.args.args + node.args.kwonlyargs):
                    takes_ctx.append(f"{path.name}:{node.name}")
    assert takes_ctx == []


def test_importing_the_pipeline_makes_no_network_call():
    """albumentations asks PyPI for its version at import unless NO_ALBUMENTATIONS_UPDATE is set; pipeline sets it."""
    code = ("import urllib.request, sys\n"
            "def refuse(*a, **k):\n    sys.exit(3)\n"
            "urllib.request.OpenerDirector.open = refuse\n"
            "import pipeline, albumentations\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    code = code.replace("import pipeline, albumentations", "import albumentations")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 3  # the check this guards against
