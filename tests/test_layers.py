"""The package layering holds: no module imports a higher layer, and no import cycle exists.

Layers, bottom to top (ARCHITECTURE.md): core -> data, models -> federation -> evaluation ->
plugins (fedsim.attacks, fedsim.defenses) -> pipeline -> experiments -> reporting -> cli and
the public API (`fedsim/__init__.py`), so the core names no particular attack or defense.
Every import counts, also one inside a function: a lazy
import of a higher layer is still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"fedsim": ROOT / "fedsim", "fedsim.attacks": ROOT / "attacks", "fedsim.defenses": ROOT / "defenses"}
LAYERS = [
    ("fedsim.core",),
    ("fedsim.data", "fedsim.models"),
    ("fedsim.federation",),
    ("fedsim.evaluation",),
    ("fedsim.attacks", "fedsim.defenses"),
    ("fedsim.pipeline",),
    ("fedsim.experiments",),
    ("fedsim.reporting",),
    ("fedsim.cli", "fedsim.api", "fedsim"),
]


def modules() -> dict[str, Path]:
    """Every fedsim module by its installed name (attacks/ and defenses/ as fedsim.*)."""
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "fedsim" and parts[0] in ("attacks", "defenses"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md"
    return best[0]


def imports(module: str, path: Path, known: set[str], top_level_only: bool = False) -> set[str]:
    """The fedsim modules `module` imports (resolved to modules, not names)."""
    tree = ast.parse(path.read_text())
    if top_level_only:  # module-level statements, also inside if/try blocks (not functions)
        scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        nodes = [n for stmt in tree.body if not isinstance(stmt, scopes) for n in ast.walk(stmt)]
    else:
        nodes = list(ast.walk(tree))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


ALL = modules()


@pytest.mark.parametrize("module", sorted(ALL))
def test_no_module_imports_a_higher_layer(module: str) -> None:
    upward = [m for m in imports(module, ALL[module], set(ALL)) if layer(m) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports higher layers: {upward}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of `graph` closes (a package importing its own
    submodules, to register them, is not one)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append([*trail, node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_no_import_cycle() -> None:
    """Module-level imports form a DAG (a cycle breaks partial imports and start-up order)."""
    graph = {m: imports(m, p, set(ALL), top_level_only=True) for m, p in ALL.items()}
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert import_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]  # the walk finds one


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself works: a core module importing the pipeline is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fedsim.pipeline.runner import run_scenario\n")
    found = imports("fedsim.core.bad", bad, set(ALL) | {"fedsim.core.bad"})
    assert "fedsim.pipeline.runner" in found
    assert layer("fedsim.pipeline.runner") > layer("fedsim.core.bad")
