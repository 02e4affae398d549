"""The book's Sphinx extension ``_ext/page_assets.py`` (no browser needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from sphinx.builders.html._assets import _JavaScript
from sphinx.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "_ext"))
import page_assets  # noqa: E402 - lives in _ext/, which Jupyter Book puts on sys.path


def make_config(static: list[str], mathjax: str, widgets: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        html_static_path=static, mathjax_path=mathjax, nb_ipywidgets_js=dict.fromkeys(widgets, {})
    )


def test_check_accepts_local_files(tmp_path):
    (tmp_path / "static" / "vendor").mkdir(parents=True)
    (tmp_path / "static" / "vendor" / "mj.js").write_text("")
    (tmp_path / "static" / "w.js").write_text("")
    config = make_config(["static"], "vendor/mj.js", ["w.js"])
    page_assets.check_offline_assets(SimpleNamespace(confdir=str(tmp_path)), config)


@pytest.mark.parametrize(
    ("mathjax", "message"),
    [
        ("vendor/missing.js", "bash .ci/book-assets"),
        ("https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js", "remote URL"),
    ],
)
def test_check_rejects_missing_or_remote_scripts(tmp_path, mathjax, message):
    (tmp_path / "static").mkdir()
    with pytest.raises(ConfigError, match=message):
        page_assets.check_offline_assets(
            SimpleNamespace(confdir=str(tmp_path)), make_config(["static"], mathjax, [])
        )


def test_check_rejects_missing_static_folder(tmp_path):
    with pytest.raises(ConfigError, match="bash .ci/book-assets"):
        page_assets.check_offline_assets(
            SimpleNamespace(confdir=str(tmp_path)), make_config(["absent"], "x.js", [])
        )


def test_repeated_inline_scripts_are_dropped_once():
    thebe = "const THEBE_JS_URL = 'x'"
    scripts = [
        _JavaScript(None, body=thebe),
        _JavaScript("_static/a.js"),
        _JavaScript("", body=thebe),  # the copy Sphinx 7.4 re-adds
        _JavaScript("_static/a.js", defer="defer"),  # different attributes: kept
    ]
    context = {"script_files": scripts}
    page_assets.drop_repeated_scripts(None, "page", "page.html", context, None)
    assert [(s.filename, s.attributes) for s in context["script_files"]] == [
        (None, {"body": thebe}),
        ("_static/a.js", {}),
        ("_static/a.js", {"defer": "defer"}),
    ]
