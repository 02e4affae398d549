"""Fixtures for the browser tests of the rendered book.

The built site (``_build/html``, made by ``jupyter-book build .``) is served by a local
``http.server`` on 127.0.0.1 and opened in headless Debian Chromium driven by Playwright.
Set ``BOOK_ROOT`` to test a book other than this repository's (it must hold ``_toc.yml`` and
``_build/html``) and ``CHROMIUM`` to use another Chromium binary. Run with ``bash .ci/browser``.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
BOOK_ROOT = Path(os.environ.get("BOOK_ROOT", REPO_ROOT)).resolve()
SITE_DIR = BOOK_ROOT / "_build" / "html"
SCREENSHOT_DIR = BOOK_ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# The flags this machine's Chromium needs: no sandbox as root, and none of Chromium's own
# background connections (they would be refused by the closed network and slow every start).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def toc_docnames(toc_path: Path) -> list[str]:
    """Document names (paths without suffix) in reading order, from a jb-book ``_toc.yml``."""
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    names = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                names.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key, []))

    walk(toc.get("parts", []) + toc.get("chapters", []))
    return [str(Path(name).with_suffix("")) if Path(name).suffix else name for name in names]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that takes ``docname`` once per page of the table of contents."""
    if "docname" in metafunc.fixturenames:
        metafunc.parametrize("docname", toc_docnames(BOOK_ROOT / "_toc.yml"))


@pytest.fixture(scope="session")
def book_root() -> Path:
    return BOOK_ROOT


@pytest.fixture(scope="session")
def docnames() -> list[str]:
    return toc_docnames(BOOK_ROOT / "_toc.yml")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


@pytest.fixture(scope="session")
def site_dir() -> Path:
    if not (SITE_DIR / "index.html").is_file():
        pytest.fail(
            f"no built book at {SITE_DIR}: run `bash .ci/book-assets` and "
            "`jupyter-book build .` first"
        )
    return SITE_DIR


@pytest.fixture(scope="session")
def base_url(site_dir: Path) -> Iterator[str]:
    """URL of the built site, served from a free port on 127.0.0.1 for the whole session."""
    handler = functools.partial(_QuietHandler, directory=str(site_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium with a fresh, empty profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (or set CHROMIUM)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
            service_workers="block",
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR
