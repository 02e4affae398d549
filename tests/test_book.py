"""Static checks of the book's sources: citations, cross-references, the table of contents,
chapter structure and the saved notebook outputs.

Nothing is executed: these tests read the notebooks and pages as files, so they run in well
under a second and catch the mistakes a full `jupyter-book build -W -n` would report only at
the end (a missing citation key, a dangling reference), plus some it would not report at all
(a notebook saved out of order, an output that shows the author's home directory).
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
BIB = BOOK / "references.bib"
NOTEBOOKS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))
PAGES = sorted(BOOK.glob("*.md"))

CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
REF = re.compile(r"\{ref\}`([^`]+)`")
DOC = re.compile(r"\{doc\}`([^`]+)`")
LABEL = re.compile(r"^\(([A-Za-z0-9_.:-]+)\)=\s*$", re.M)
BIB_ENTRY = re.compile(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,", re.M)
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|root|home)/")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)


def markdown_sources() -> list[tuple[str, str]]:
    """(name, text) of every markdown cell of every chapter and of every markdown page."""
    sources = []
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "markdown":
                sources.append((f"{path.name} cell {index}", cell.source))
    for path in PAGES:
        sources.append((path.name, path.read_text(encoding="utf-8")))
    return sources


def target(role_text: str) -> str:
    """The target of a MyST role: ``label`` or ``shown text <label>``."""
    match = re.search(r"<([^<>]+)>\s*$", role_text)
    return (match.group(1) if match else role_text).strip()


def bib_keys() -> list[str]:
    return [key for _, key in BIB_ENTRY.findall(BIB.read_text(encoding="utf-8"))]


def labels() -> list[str]:
    return [label for _, text in markdown_sources() for label in LABEL.findall(text)]


def test_there_are_chapters_and_pages():
    assert len(NOTEBOOKS) >= 9, [p.name for p in NOTEBOOKS]
    assert {"intro.md", "errata.md", "glossary.md", "notation.md", "bibliography.md"} <= {
        p.name for p in PAGES
    }


def test_bib_keys_are_unique():
    keys = bib_keys()
    assert keys, "references.bib has no entries"
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    assert not duplicates, f"defined more than once in references.bib: {duplicates}"


def test_bib_is_the_only_bibliography():
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert config["bibtex_bibfiles"] == ["book/references.bib"]
    assert not list(BOOK.rglob("*.bib")) or list(BOOK.rglob("*.bib")) == [BIB]


def test_bib_entries_have_author_title_year():
    text = BIB.read_text(encoding="utf-8")
    starts = [m.start() for m in BIB_ENTRY.finditer(text)] + [len(text)]
    for begin, end in zip(starts, starts[1:], strict=False):
        entry = text[begin:end]
        key = BIB_ENTRY.match(entry).group(2)
        for field in ("author", "title", "year"):
            assert re.search(rf"^\s*{field}\s*=", entry, re.M), f"{key} has no {field}"


def test_every_cited_key_is_in_the_bibliography():
    known = set(bib_keys())
    missing = []
    for name, text in markdown_sources():
        for group in CITE.findall(text):
            for key in group.split(","):
                if key.strip() not in known:
                    missing.append(f"{name}: {key.strip()}")
    assert not missing, "cited but not in references.bib:\n" + "\n".join(missing)


def test_every_bib_entry_is_cited():
    cited = {
        key.strip()
        for _, text in markdown_sources()
        for group in CITE.findall(text)
        for key in group.split(",")
    }
    unused = sorted(set(bib_keys()) - cited)
    assert not unused, f"in references.bib but cited nowhere: {unused}"


def test_labels_are_unique():
    found = labels()
    duplicates = sorted({label for label in found if found.count(label) > 1})
    assert not duplicates, f"labels defined more than once: {duplicates}"


def test_every_ref_target_exists():
    known = set(labels())
    missing = [
        f"{name}: {target(ref)}"
        for name, text in markdown_sources()
        for ref in REF.findall(text)
        if target(ref) not in known
    ]
    assert not missing, "{ref} to a label that no page defines:\n" + "\n".join(missing)


def test_every_doc_target_exists():
    missing = []
    for name, text in markdown_sources():
        for doc in DOC.findall(text):
            path = BOOK / target(doc)
            if not (path.with_suffix(".md").exists() or path.with_suffix(".ipynb").exists()):
                missing.append(f"{name}: {target(doc)}")
    assert not missing, "{doc} to a page that does not exist:\n" + "\n".join(missing)


def toc_files(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["file"]] if "file" in node else []
        if "root" in node:
            found.append(node["root"])
        for value in node.values():
            if isinstance(value, (list, dict)):
                found += toc_files(value)
        return found
    if isinstance(node, list):
        return [file for item in node for file in toc_files(item)]
    return []


def test_every_toc_file_exists_and_every_chapter_is_listed():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = toc_files(toc)
    assert "book/intro" in files
    for file in files:
        path = ROOT / file
        assert path.with_suffix(".md").exists() or path.with_suffix(".ipynb").exists(), file
    for notebook in NOTEBOOKS:
        assert f"book/{notebook.stem}" in files, f"{notebook.name} is not in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_has_summary_exercises_and_solutions(path):
    notebook = nbformat.read(path, as_version=4)
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    markdown = FENCE.sub("", markdown)  # a `# comment` in a shell example is not a heading
    assert len(re.findall(r"^# ", markdown, re.M)) == 1, "one `# Title` per chapter"
    assert re.search(r"^##\s+Summary\s*$", markdown, re.M), "no '## Summary' heading"
    assert re.search(r"^##\s+Exercises\s*$", markdown, re.M), "no '## Exercises' heading"
    assert re.search(r"^:class:\s*dropdown\s*$", markdown, re.M), "no dropdown solution"


def output_texts(cell) -> list[str]:
    texts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            texts.append(output["text"])
        if "traceback" in output:
            texts.append("\n".join(output["traceback"]))
        for mime, value in output.get("data", {}).items():
            if mime.startswith("text/") or mime.endswith("json"):
                texts.append(value if isinstance(value, str) else str(value))
    return texts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_show_no_machine_paths(path):
    notebook = nbformat.read(path, as_version=4)
    leaks = [
        f"cell {index}: {text[max(0, match.start() - 40) : match.end() + 40]!r}"
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        for text in output_texts(cell)
        for match in MACHINE_PATH.finditer(text)
    ]
    assert not leaks, "absolute machine paths in saved outputs:\n" + "\n".join(leaks)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_was_executed_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)
    counts = [c.execution_count for c in notebook.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"execution counts {counts}: re-execute the notebook from a fresh kernel"
    )


PACKAGE_SOURCE = "\n".join(
    p.read_text(encoding="utf-8") for p in sorted((ROOT / "src" / "minigpt").glob("*.py"))
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shown_source_is_the_current_package_source(path):
    """A saved ``show_source(...)`` output must still be the package's code, verbatim: the book
    build renders saved outputs, so a change to ``src/minigpt`` must re-execute the chapters
    that show it."""
    notebook = nbformat.read(path, as_version=4)
    stale = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or "show_source(" not in cell.source:
            continue
        shown = [o["data"]["text/plain"] for o in cell.outputs if "text/plain" in o.get("data", {})]
        assert shown, f"cell {index} calls show_source but has no saved output"
        for text in shown:
            if text.strip("\n") not in PACKAGE_SOURCE:
                stale.append(f"cell {index}: {text.splitlines()[0]!r}")
    assert not stale, (
        "saved source differs from src/minigpt (re-execute the notebook):\n" + "\n".join(stale)
    )


def code_lines(source: str) -> int:
    """Lines of a def/class source, not counting docstrings (of it and of what it contains)."""
    tree = ast.parse(textwrap.dedent(source))
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = textwrap.dedent(source).strip("\n").splitlines()
    return sum(1 for n, line in enumerate(lines, 1) if line.strip() and n not in doc_lines)


SHOWN_LINES, SHOWN_COLUMNS = 60, 88


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shown_source_fits_one_screen(path):
    """Every object a chapter displays is a lesson: at most 60 lines (docstrings aside) and
    88 columns, so the rendered page neither scrolls sideways nor hides the algorithm."""
    notebook = nbformat.read(path, as_version=4)
    too_big = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or "show_source(" not in cell.source:
            continue
        for output in cell.outputs:
            text = output.get("data", {}).get("text/plain")
            if text is None:
                continue
            name = text.strip().splitlines()[0][:60]
            width = max(len(line) for line in text.splitlines())
            if code_lines(text) > SHOWN_LINES or width > SHOWN_COLUMNS:
                too_big.append(f"cell {index} {name!r}: {code_lines(text)} lines, {width} cols")
    assert not too_big, "displayed objects larger than one screen:\n" + "\n".join(too_big)


def test_no_package_function_is_longer_than_60_lines():
    """One idea per function: no function or method in src/minigpt over 60 lines, docstring
    excluded."""
    long = []
    for file in sorted((ROOT / "src" / "minigpt").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                first = body[0]
                is_doc = isinstance(first, ast.Expr) and isinstance(
                    getattr(first, "value", None), ast.Constant
                )
                start = body[1].lineno if is_doc and len(body) > 1 else first.lineno
                if node.end_lineno - start + 1 > 60:
                    long.append(f"{file.name}:{node.lineno} {node.name}")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_code_fits_88_columns(path):
    """The book shows code at 88 columns; wider lines wrap and are hard to read."""
    notebook = nbformat.read(path, as_version=4)
    wide = [
        f"cell {index}: {len(line)} columns: {line[:50]!r}"
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if len(line) > SHOWN_COLUMNS
    ]
    assert not wide, "code lines wider than 88 columns:\n" + "\n".join(wide)
