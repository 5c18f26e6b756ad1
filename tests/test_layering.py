"""The packages form layers, so each can be read (and tested) without those above it:
medrega (the domain library) <- model (the network) <- tasks (stages) <- flows (orchestration)
<- cli (the command). An import of a higher layer from a lower one, even inside a function,
would make a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ["medrega", "model", "tasks", "flows", "cli"]
ALLOWED = {"medrega": set(), "model": {"medrega"}, "tasks": {"medrega", "model"},
           "flows": {"medrega"}, "cli": {"medrega", "model", "tasks", "flows"}}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_package_imports_a_layer_above_it():
    wrong = []
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            above = (imports(path) & set(LAYERS)) - ALLOWED[package] - {package}
            wrong += [f"{path.relative_to(REPO)} imports {p}" for p in sorted(above)]
    assert wrong == []


def test_the_layer_table_is_acyclic():
    # every allowed edge points to an earlier layer
    for package, allowed in ALLOWED.items():
        assert all(LAYERS.index(dep) < LAYERS.index(package) for dep in allowed)


def test_no_product_function_is_longer_than_80_lines():
    """A function longer than a screen is doing several jobs: split it (the issue's bar)."""
    long = []
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
