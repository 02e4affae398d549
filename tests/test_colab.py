"""The Colab setup cell that opens every chapter notebook.

Each notebook's first code cell is the same cell, ``COLAB_CELL``. Outside Colab it must do
nothing; on Colab it clones the book's repository (the one ``_config.yml`` names, which is also
where the Colab launch buttons point), installs it with ``pip install -e``, puts ``src`` on the
path and moves into ``book/``. These tests simulate Colab without touching the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
CLONE_DIR = "/content/minigpt-book"

COLAB_CELL = """\
# Colab: fetch the book's repository and install minigpt. Does nothing anywhere else.
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    if not os.path.isdir("/content/minigpt-book"):
        subprocess.run(["git", "clone", "--depth=1",
                        "https://github.com/minigpt-book/minigpt-book", "/content/minigpt-book"],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e",
                        "/content/minigpt-book"], check=True)
    sys.path.insert(0, "/content/minigpt-book/src")
    os.chdir("/content/minigpt-book/book")"""


def repository_url() -> str:
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    return config["repository"]["url"]


def first_code_cell(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            return cell.source
    raise AssertionError(f"{path.name} has no code cell")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_colab_cell(path):
    assert first_code_cell(path).rstrip() == COLAB_CELL, (
        f"{path.name}: the first code cell must be the Colab setup cell of tests/test_colab.py"
    )


def run_cell() -> dict:
    namespace: dict = {"__name__": "__colab_cell__"}
    exec(compile(COLAB_CELL, "<colab cell>", "exec"), namespace)
    return namespace


def test_outside_colab_the_cell_does_nothing(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Colab cell ran {args} outside Colab")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(os, "chdir", refuse)
    path_before, cwd_before = list(sys.path), os.getcwd()
    run_cell()
    assert sys.path == path_before
    assert os.getcwd() == cwd_before


class FakeColab:
    """Stands in for Colab: a google.colab module, and a record of what the cell did."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, cloned: bool) -> None:
        google = types.ModuleType("google")
        colab = types.ModuleType("google.colab")
        google.colab = colab
        monkeypatch.setitem(sys.modules, "google", google)
        monkeypatch.setitem(sys.modules, "google.colab", colab)
        monkeypatch.setattr(sys, "path", list(sys.path))
        self.commands: list[tuple[list[str], dict]] = []
        self.chdirs: list[str] = []
        real_isdir = os.path.isdir

        def isdir(path) -> bool:
            return cloned if os.fspath(path) == CLONE_DIR else real_isdir(path)

        monkeypatch.setattr(os.path, "isdir", isdir)
        monkeypatch.setattr(os, "chdir", lambda path: self.chdirs.append(os.fspath(path)))
        monkeypatch.setattr(
            subprocess, "run", lambda command, **kwargs: self.commands.append((command, kwargs))
        )


def test_on_colab_the_cell_clones_installs_and_enters_book(monkeypatch):
    colab = FakeColab(monkeypatch, cloned=False)
    run_cell()
    assert colab.commands == [
        (["git", "clone", "--depth=1", repository_url(), CLONE_DIR], {"check": True}),
        ([sys.executable, "-m", "pip", "install", "-q", "-e", CLONE_DIR], {"check": True}),
    ]
    assert sys.path[0] == f"{CLONE_DIR}/src"
    assert colab.chdirs == [f"{CLONE_DIR}/book"]


def test_on_colab_a_second_run_does_not_clone_again(monkeypatch):
    colab = FakeColab(monkeypatch, cloned=True)
    run_cell()
    assert colab.commands == []
    assert sys.path[0] == f"{CLONE_DIR}/src"
    assert colab.chdirs == [f"{CLONE_DIR}/book"]


def test_the_clone_is_a_pip_installable_project_with_the_book():
    """What the cell expects inside the clone: this repository's layout."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    build = pyproject["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(req.startswith("setuptools") for req in build["requires"])
    project = pyproject["project"]
    assert project["name"] == "minigpt"
    assert (ROOT / project["readme"]).is_file()
    # The cell puts <clone>/src on sys.path: the package must live there.
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    assert (ROOT / "src" / "minigpt" / "__init__.py").is_file()
    # The cell moves into <clone>/book, where the notebooks are.
    assert (ROOT / "book").is_dir()
    # One repository everywhere: the cell, the book's launch buttons, the package metadata.
    assert f'"{repository_url()}"' in COLAB_CELL
    assert project["urls"]["Homepage"] == repository_url()
