"""Every chapter notebook runs on Colab.

Each notebook's first code cell is the same cell, ``COLAB_CELL``. Outside Colab it must do
nothing; on Colab it clones the book's repository (the one ``_config.yml`` names, which is also
where the Colab launch buttons point), installs it with ``pip install -e``, puts ``src`` on the
path and moves into ``book/``. These tests simulate Colab without touching the network.

After that cell a notebook may import only what Colab has: the standard library, minigpt and
its dependencies (installed by the cell), and the packages Colab preinstalls. The book's own
toolchain (jupyter-book, myst-nb, the test tools) is not there, so chapters glue numbers with
``minigpt.book.glue``, which works without myst-nb. Two tests check the imports: one reads
them from every notebook, one runs them in a Python where the book toolchain cannot be
imported.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import yaml
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from minigpt.book import glue

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
        repo = "https://github.com/minigpt-book/minigpt-book"
        subprocess.run(["git", "clone", "--depth=1", repo, "/content/minigpt-book"],
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


# --- imports that Colab can satisfy -----------------------------------------------------

# Packages a Colab runtime preinstalls (its standard image), by import name.
COLAB_PREINSTALLED = frozenset(
    {"IPython", "huggingface_hub", "ipywidgets", "matplotlib", "numpy", "pandas", "PIL",
     "requests", "safetensors", "scipy", "torch", "tqdm", "transformers", "yaml"}
)  # fmt: skip
# Installed here for building and testing the book, but not on Colab and not by the Colab
# cell: a notebook that imports one of them stops on Colab with ModuleNotFoundError.
BOOK_TOOLCHAIN = frozenset(
    {"jupyter_book", "myst_nb", "myst_parser", "sphinx", "sphinx_book_theme", "nbval",
     "pytest", "hypothesis", "ruff"}
)  # fmt: skip


def minigpt_dependencies() -> set[str]:
    """Import names of the dependencies ``pip install -e`` installs with minigpt."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    names = (re.match(r"[A-Za-z0-9_.-]+", req)[0] for req in pyproject["project"]["dependencies"])
    return {name.lower().replace("-", "_") for name in names}


def notebook_imports(path: Path) -> list[ast.stmt]:
    """Every ``import`` statement in the notebook's code cells (magics and ``!`` lines skipped)."""
    statements = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        lines = [ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
                statements.append(node)
    return statements


def top_level(statement: ast.stmt) -> set[str]:
    if isinstance(statement, ast.ImportFrom):
        return {statement.module.partition(".")[0]}
    return {alias.name.partition(".")[0] for alias in statement.names}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_only_what_colab_has(path):
    allowed = set(sys.stdlib_module_names) | COLAB_PREINSTALLED | minigpt_dependencies()
    allowed.add("minigpt")
    missing = {
        f"line {statement.lineno} of a cell: {ast.unparse(statement)}"
        for statement in notebook_imports(path)
        if not top_level(statement) <= allowed
    }
    assert not missing, (
        f"{path.name} imports what Colab lacks (add it to the Colab cell's install, or to "
        f"COLAB_PREINSTALLED if Colab ships it): {sorted(missing)}"
    )


# Runs in a fresh Python: hides the book toolchain from every import finder (so `import x`
# raises ModuleNotFoundError and importlib.util.find_spec(x) is None, as where x is not
# installed), then runs the import statements of every notebook; prints the failures as JSON.
IMPORT_RUNNER = """
import json, sys

class Hide:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)

sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
failures = {}
for notebook, statements in NOTEBOOK_IMPORTS.items():
    for statement in statements:
        try:
            exec(statement, {})
        except Exception as error:
            failures.setdefault(notebook, []).append(f"{statement}: {error!r}")
print(json.dumps(failures))
"""


@pytest.mark.slow
def test_notebook_imports_succeed_without_the_book_toolchain():
    """The real imports, in a Python where jupyter-book, myst-nb, Sphinx, pytest... are absent."""
    imports = {path.name: [ast.unparse(s) for s in notebook_imports(path)] for path in NOTEBOOKS}
    script = (
        f"BLOCKED = {sorted(BOOK_TOOLCHAIN)!r}\nNOTEBOOK_IMPORTS = {imports!r}\n" + IMPORT_RUNNER
    )
    path = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    env.pop("MPLBACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT / "book", env=env, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, f"imports that fail without the book toolchain: {failures}"


def test_the_import_runner_blocks_the_book_toolchain():
    """The check above can fail: a notebook importing myst_nb is reported."""
    script = "BLOCKED = ['myst_nb']\nNOTEBOOK_IMPORTS = {'x': ['import myst_nb']}\n"
    result = subprocess.run(
        [sys.executable, "-c", script + IMPORT_RUNNER], capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert "No module named 'myst_nb'" in json.loads(result.stdout)["x"][0]


# --- minigpt.book.glue: myst-nb's glue when installed, a plain display otherwise ---------


@pytest.fixture
def shell():
    """An in-process IPython shell, so that display() output can be captured."""
    return InteractiveShell.instance()


def glued(shell, name: str, value, display: bool) -> list:
    with capture_output() as captured:
        glue(name, value, display=display)
    return [(output.data, output.metadata) for output in captured.outputs]


@pytest.mark.parametrize("display", [True, False])
def test_glue_with_myst_nb_is_myst_nbs_glue(shell, display):
    myst_nb = pytest.importorskip("myst_nb")
    with capture_output() as captured:
        myst_nb.glue("answer", 42, display=display)
    expected = [(output.data, output.metadata) for output in captured.outputs]
    outputs = glued(shell, "answer", 42, display)
    assert outputs == expected
    assert outputs[0][1]["scrapbook"]["name"] == "answer"


def test_glue_without_myst_nb_displays_the_value(shell, monkeypatch):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # `import myst_nb` raises ImportError
    outputs = glued(shell, "answer", 42, display=True)
    assert [data["text/plain"] for data, _ in outputs] == ["42"]
    assert all("scrapbook" not in metadata for _, metadata in outputs)


def test_glue_without_myst_nb_and_display_false_shows_nothing(shell, monkeypatch):
    monkeypatch.setitem(sys.modules, "myst_nb", None)
    assert glued(shell, "answer", 42, display=False) == []
