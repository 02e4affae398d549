"""The package's shape, checked statically: one-way imports at module tops, a docstring at
the top of every module, and the KV cache's tensors touched only by the cache itself.

These read ``src/minigpt`` as text (``ast``); nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "minigpt"
MODULES = sorted(SRC.glob("*.py"))


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def minigpt_imports(node: ast.AST) -> list[str]:
    """The minigpt modules an import statement names (``from minigpt import a`` -> a)."""
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "minigpt":
            return [alias.name for alias in node.names]
        if node.module.startswith("minigpt."):
            return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("minigpt.")]
    return []


def top_level_graph() -> dict[str, set[str]]:
    """module -> the minigpt modules it imports at its top level (type-checking aside)."""
    graph = {}
    for path in MODULES:
        deps = set()
        for node in tree(path).body:
            deps.update(d for d in minigpt_imports(node) if (SRC / f"{d}.py").exists())
        graph[path.stem] = deps - {path.stem}
    return graph


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_has_a_docstring(path):
    assert ast.get_docstring(tree(path)), f"{path.name} has no module docstring"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_minigpt_import_inside_a_function(path):
    """An import hidden in a function hides a dependency (and often a cycle)."""
    hidden = [
        f"{path.name}:{inner.lineno}"
        for node in ast.walk(tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
        if minigpt_imports(inner)
    ]
    assert not hidden, f"minigpt imported inside a function: {hidden}"


def test_imports_flow_one_way():
    """The module graph has no cycle, so every module can be read after the ones it uses."""
    graph, done, path = top_level_graph(), set(), []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_only_the_kv_cache_touches_its_tensors():
    """Decoding, the model and beam search go through KVCache's methods, never cache.k/v."""
    offenders = []
    for path in MODULES:
        for node in ast.walk(tree(path)):
            if (isinstance(node, ast.Attribute) and node.attr in {"k", "v"}
                    and isinstance(node.value, ast.Name) and "cache" in node.value.id):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"KV cache tensors touched outside KVCache: {offenders}"
