"""The package's shape, checked statically: one-way imports at module tops, a docstring at
the top of every module, and the KV cache's tensors touched only by the cache itself.

These read ``src/minigpt`` as text (``ast``); nothing is imported or run. The last test
builds the wheel and installs it into a fresh virtual environment: what a user of
``pip install`` gets (the configs as package data, the ``minigpt`` console script).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "minigpt"
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


def test_no_module_is_much_longer_than_500_lines():
    """One idea per module keeps each one short; a module past ~500 lines holds two ideas
    and is split by idea (as ``data`` was into ``registry`` and ``data``)."""
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines())
               for path in MODULES}
    assert not {name: n for name, n in lengths.items() if n > 550}, lengths


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


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_a_console_script(tmp_path):
    project = tmp_path / "project"  # a copy: building writes build/ and *.egg-info
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(project), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("minigpt-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        shipped = {Path(n).name for n in names if n.startswith("minigpt/configs/")}
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert shipped == {p.name for p in (SRC / "configs").glob("*.json")} != set()
    assert "minigpt = minigpt.cli:main" in entry_points.decode()
    # installed (not editable) beside the dependencies already here, run outside the checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "check": True}
    version = subprocess.run([bin_dir / "minigpt", "--version"], **run).stdout
    assert version.startswith("minigpt ") and "+source" not in version
    where = subprocess.run([bin_dir / "python", "-c", "from minigpt.cli import resolve_config;"
                            "print(resolve_config('shakespeare_char'))"], **run).stdout.strip()
    assert Path(where).is_relative_to(venv) and Path(where).name == "shakespeare_char.json"
