"""Sphinx extension: the scripts a book page loads are local, present, and loaded once.

The rendered book must work with no network, so ``_config.yml`` points ``mathjax_path`` and
myst-nb's ``nb_ipywidgets_js`` at files under ``_static/vendor/``. Those files are fetched from
npm by ``.ci/book-assets`` into the gitignored ``.book-assets/`` folder; this extension runs
that script when they are missing, and stops the build early, with a message that says what to
do, when they are still missing or when a configured script is a remote URL.

It also drops repeated inline scripts from each page: Sphinx 7.4 re-adds an inline script
registered with ``app.add_js_file(None, body=...)`` as a second copy (``None`` and ``""``
compare unequal), so sphinx-thebe's ``const THEBE_JS_URL = ...`` appeared twice and every page
raised "Identifier 'THEBE_JS_URL' has already been declared".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ConfigError

FETCH_HINT = (
    "run `bash .ci/book-assets` in the repository root (it needs Node.js's npm), then build again"
)


def _local_scripts(config: Config) -> list[str]:
    """Scripts that must resolve to files under one of the ``html_static_path`` folders."""
    return [config.mathjax_path, *config.nb_ipywidgets_js]


def fetch_assets(confdir: Path) -> None:
    """Run ``.ci/book-assets`` once when the vendored scripts are missing and npm is available."""
    script = confdir / ".ci" / "book-assets"
    if script.is_file() and shutil.which("npm") and shutil.which("bash"):
        subprocess.run(["bash", str(script)], check=False)


def check_offline_assets(app: Sphinx, config: Config) -> None:
    """Raise ConfigError unless every vendored script is a local file that exists."""
    static_dirs = [Path(app.confdir, entry) for entry in config.html_static_path]
    if not all(d.is_dir() for d in static_dirs):
        fetch_assets(Path(app.confdir))
    missing_dirs = [str(d) for d in static_dirs if not d.is_dir()]
    if missing_dirs:
        raise ConfigError(f"html_static_path folder(s) missing: {missing_dirs}; {FETCH_HINT}")
    for script in _local_scripts(config):
        if "://" in script or script.startswith("//"):
            raise ConfigError(
                f"{script!r} is a remote URL; the book must work offline, so serve it from "
                "_static/vendor/ (add it to .ci/book-assets)"
            )
        if not any((d / script).is_file() for d in static_dirs):
            raise ConfigError(f"{script!r} not found under html_static_path; {FETCH_HINT}")


def drop_repeated_scripts(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    """Keep only the first of several identical ``<script>`` entries of a page."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    unique = []
    for script in scripts:
        filename = os.fspath(getattr(script, "filename", script) or "")
        attributes = getattr(script, "attributes", {})
        key = (filename, tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app: Sphinx) -> dict[str, object]:
    # Priority 700: before Sphinx's own html_static_path check (800), which would only warn and
    # drop a missing folder. Drop repeated scripts (900) after the extensions that add them.
    app.connect("config-inited", check_offline_assets, priority=700)
    app.connect("html-page-context", drop_repeated_scripts, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
