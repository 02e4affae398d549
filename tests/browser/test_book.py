"""The rendered book works in a browser with no network.

For every page in ``_toc.yml``: it loads with no console error, every request stays on the
local server, every formula is typeset by MathJax, every image has loaded, every saved
ipywidget is rendered, a notebook page's Colab button opens that notebook on Colab, and
nothing is wider than its box at 1280 px and at 768 px (no sideways scrolling, no clipping).
Plus: no page links a remote script or stylesheet, and the search page finds words.
A full-page screenshot of each page goes to ``_build/screenshots/`` for a human to look at.
"""

from __future__ import annotations

import html.parser
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

COLAB_PREFIX = "https://colab.research.google.com/github/minigpt-book/minigpt-book/blob/main/"
LOCAL_HOSTS = {"127.0.0.1"}
# Raw TeX that MathJax should have replaced: \( \) \[ \] $$, or $...\command...$.
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$[^$\n]{0,200}\\[A-Za-z]+[^$\n]{0,200}\$")
LOAD_TIMEOUT_MS = 60_000
WAIT_TIMEOUT_MS = 30_000  # for MathJax and widgets, once the page has loaded

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")


def is_notebook(book_root: Path, docname: str) -> bool:
    return (book_root / f"{docname}.ipynb").is_file()


@dataclass
class PageLog:
    """What a page did while it loaded."""

    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


def open_page(browser, url: str):
    """Open ``url`` in a new tab; block and record every request that leaves 127.0.0.1."""
    page = browser.new_page()
    log = PageLog()

    def route(route) -> None:
        request_url = route.request.url
        log.requests.append(request_url)
        if urlsplit(request_url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            log.blocked.append(request_url)
            route.abort()

    def on_response(response) -> None:
        if response.status >= 400:
            log.failed.append(f"{response.status} {response.url}")

    def on_console(message) -> None:
        if message.type == "error":
            where = message.location.get("url", "") if message.location else ""
            log.console_errors.append(f"{message.text} ({where})")

    page.route("**/*", route)
    page.on("response", on_response)
    page.on("console", on_console)
    page.on("pageerror", lambda error: log.console_errors.append(f"uncaught: {error}"))
    page.on("requestfailed", lambda r: log.failed.append(f"{r.failure} {r.url}"))
    page.goto(url, wait_until="load", timeout=LOAD_TIMEOUT_MS)
    return page, log


def wait_until(page, expression: str) -> bool:
    """Wait for a JavaScript condition; False on timeout, so the assertions can say why."""
    try:
        page.wait_for_function(expression, timeout=WAIT_TIMEOUT_MS)
    except sync_api.TimeoutError:
        return False
    return True


def wait_for_math(page) -> None:
    """Wait until MathJax has finished its first typesetting pass (if the page loads it)."""
    if wait_until(
        page,
        "() => !document.querySelector('.math') || (window.MathJax && MathJax.startup"
        " && MathJax.startup.promise)",
    ):
        page.evaluate(
            "() => window.MathJax && MathJax.startup"
            " ? MathJax.startup.promise.then(() => true) : true"
        )


WIDGET_COUNTS = """() => ({
  views: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')
    .length,
  rendered: [...document.querySelectorAll('.widget-subarea')]
    .filter(el => el.querySelector('.jupyter-widgets')).length,
  hasState: !!document.querySelector('script[type="application/vnd.jupyter.widget-state+json"]'),
})"""

# The article's text with code, scripts and typeset math removed: what must hold no raw TeX.
PROSE_TEXT = """() => {
  const article = document.querySelector('article') || document.body;
  const copy = article.cloneNode(true);
  copy.querySelectorAll('pre, code, script, style, mjx-container, .highlight, .cell_input,'
    + ' .output, .cell_output').forEach(el => el.remove());
  return copy.textContent;
}"""

MATH_STATUS = """() => {
  const math = [...document.querySelectorAll('.math')];
  return {
    total: math.length,
    untypeset: math.filter(el => !el.querySelector('mjx-container'))
      .map(el => el.textContent.slice(0, 80)),
    errors: [...document.querySelectorAll('mjx-merror')]
      .map(el => el.getAttribute('data-mjx-error') || el.textContent),
  };
}"""

# Every element whose content is wider than its box (scrollWidth > clientWidth): a code cell
# the reader would scroll sideways, a formula cut at the column edge, a clipped label.
# Exempt, because their overflow is by design and hides or cuts nothing the reader sees:
# - the inner boxes of a typeset formula (MathJax places glyphs with negative margins and
#   fixed em sizes, so its boxes report 1-2 px more than their width; the formula's own
#   mjx-container is checked like any element), including mjx-assistive-mml, the formula's
#   copy for screen readers that MathJax clips to nothing;
# - the inside of an ipywidgets slider (noUiSlider centres its handle on the ends of the
#   track, so the handle overhangs the track by half its width).
OVERFLOWING = """() => {
  const exempt = 'mjx-container *, .widget-slider .slider-container, .widget-slider .noUi-target,'
    + ' .widget-slider .noUi-target *';
  return [...document.querySelectorAll('body *')]
    .filter(el => el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1)
    .filter(el => !el.matches(exempt))
    .map(el => `<${el.tagName.toLowerCase()} class="${el.className}"> ${el.scrollWidth} px`
      + ` in ${el.clientWidth} px: ${(el.textContent || '').trim().slice(0, 60)}`);
}"""

# The width of 88 characters of code (the limit for the code the book shows) next to the width
# a visible code cell's text has; null on a page without one.
CODE_COLUMNS = """() => {
  const pre = [...document.querySelectorAll('div.cell_input pre')].find(p => p.clientWidth > 0);
  if (!pre) return null;
  const probe = document.createElement('span');
  probe.textContent = 'x'.repeat(88);
  probe.style.whiteSpace = 'pre';
  pre.append(probe);
  const needed = probe.getBoundingClientRect().width;
  probe.remove();
  const style = getComputedStyle(pre);
  const room = pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  return {needed, room};
}"""

WIDTHS = (1280, 768)  # a laptop; a tablet, where the sidebars fold away and the text reflows


def assert_nothing_overflows(page, docname: str) -> None:
    """At each width in WIDTHS: no element is wider than its box, and 88 code columns fit."""
    try:
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 900})
            # The theme animates its sidebars for 0.4 s; fit-math.js rescales on resize.
            page.wait_for_timeout(600)
            overflowing = page.evaluate(OVERFLOWING)
            assert not overflowing, (
                f"{docname} at {width} px: {len(overflowing)} element(s) wider than their box:\n"
                + "\n".join(overflowing[:20])
            )
            columns = page.evaluate(CODE_COLUMNS)
            if columns and width >= 1280:
                assert columns["needed"] <= columns["room"], (
                    f"{docname} at {width} px: 88 columns of code need {columns['needed']:.0f}"
                    f" px, a code cell has {columns['room']:.0f} px"
                )
    finally:
        page.set_viewport_size({"width": WIDTHS[0], "height": 900})


BROKEN_IMAGES = """() => [...document.querySelectorAll('img')]
  .filter(img => !(img.complete && img.naturalWidth > 0))
  .map(img => img.currentSrc || img.src)"""


def test_page(docname, book_root, browser, base_url, site_dir, screenshot_dir):
    html_file = site_dir / f"{docname}.html"
    assert html_file.is_file(), f"{docname} is in _toc.yml but {html_file} was not built"
    page, log = open_page(browser, base_url + f"{docname}.html")
    try:
        wait_for_math(page)
        widgets = page.evaluate(WIDGET_COUNTS)
        if widgets["views"]:
            assert widgets["hasState"], f"{docname}: widget views but no saved widget state"
            wait_until(page, f"() => ({WIDGET_COUNTS})().rendered >= {widgets['views']}")
        page.wait_for_load_state("networkidle", timeout=LOAD_TIMEOUT_MS)
        # Let lazily decoded images settle before checking them.
        page.evaluate("() => Promise.all([...document.images].map(i => i.decode().catch(() => 0)))")

        shot = screenshot_dir / (docname.replace("/", "__") + ".png")
        page.screenshot(path=str(shot), full_page=True)

        assert not log.blocked, f"{docname}: requests left the local server: {log.blocked}"
        assert not log.failed, f"{docname}: failed requests: {log.failed}"
        assert not log.console_errors, f"{docname}: console errors: {log.console_errors}"

        math = page.evaluate(MATH_STATUS)
        assert not math["untypeset"], f"{docname}: formulas not typeset: {math['untypeset']}"
        assert not math["errors"], f"{docname}: MathJax errors: {math['errors']}"
        raw = RAW_TEX.findall(page.evaluate(PROSE_TEXT))
        assert not raw, f"{docname}: raw TeX left in the page: {raw[:5]}"

        broken = page.evaluate(BROKEN_IMAGES)
        assert not broken, f"{docname}: images that did not load: {broken}"

        widgets = page.evaluate(WIDGET_COUNTS)
        assert widgets["rendered"] >= widgets["views"], f"{docname}: widgets not rendered"

        assert_nothing_overflows(page, docname)

        colab = page.eval_on_selector_all(
            'a[href^="https://colab.research.google.com"]', "els => els.map(a => a.href)"
        )
        if is_notebook(book_root, docname):
            assert colab == [f"{COLAB_PREFIX}{docname}.ipynb"], f"{docname}: Colab link {colab}"
        else:
            assert not colab, f"{docname} is not a notebook but has a Colab link {colab}"
    finally:
        page.close()


def test_notebook_with_widgets_renders_them(docnames, book_root, browser, base_url, site_dir):
    """At least one notebook saves widget state, and its widgets come out as live controls."""
    with_state = [
        name
        for name in docnames
        if is_notebook(book_root, name)
        and "application/vnd.jupyter.widget-state+json"
        in (site_dir / f"{name}.html").read_text(encoding="utf-8")
    ]
    if not with_state:
        pytest.skip("no notebook in the table of contents has saved widget state")
    page, log = open_page(browser, base_url + f"{with_state[0]}.html")
    try:
        page.wait_for_selector(".widget-subarea .jupyter-widgets", timeout=WAIT_TIMEOUT_MS)
        controls = page.locator(
            ".widget-subarea .widget-slider, .widget-subarea .widget-button,"
            " .widget-subarea .widget-dropdown, .widget-subarea .widget-text,"
            " .widget-subarea .widget-toggle-buttons,"
            " .widget-subarea .widget-checkbox"
        )
        assert controls.count() > 0, f"{with_state[0]}: no rendered widget control"
        assert not log.blocked
    finally:
        page.close()


class _RemoteAssetFinder(html.parser.HTMLParser):
    """Collects <script src> and <link href> (other than plain hyperlinks) that are remote."""

    def __init__(self) -> None:
        super().__init__()
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = None
        if tag in ("script", "img", "iframe", "source", "video", "audio"):
            url = values.get("src")
        elif tag == "link":
            url = values.get("href")
        if url and (url.startswith("//") or urlsplit(url).scheme in ("http", "https")):
            self.remote.append(f"<{tag}> {url}")


def test_no_page_loads_remote_assets(site_dir):
    """No built HTML page (including search and index pages) links a remote script or style."""
    pages = sorted(site_dir.rglob("*.html"))
    assert pages
    remote = {}
    for path in pages:
        finder = _RemoteAssetFinder()
        finder.feed(path.read_text(encoding="utf-8"))
        if finder.remote:
            remote[str(path.relative_to(site_dir))] = finder.remote
    assert not remote, f"remote assets: {remote}"


@pytest.mark.parametrize(
    ("query", "expected_page"),
    [("perplexity", "book/glossary.html"), ("tokenization", "book/glossary.html")],
)
def test_search_finds(query, expected_page, browser, base_url, site_dir):
    if not (site_dir / expected_page).is_file():
        pytest.skip(f"{expected_page} is not in this build")
    page, log = open_page(browser, base_url + f"search.html?q={query}")
    try:
        # Sphinx writes a summary ("Search finished, found N page(s) ...") when it is done.
        page.wait_for_selector("#search-results .search-summary", timeout=LOAD_TIMEOUT_MS)
        page.wait_for_function(
            "() => !document.querySelector('#search-results .search-summary')"
            ".textContent.includes('Searching')",
            timeout=LOAD_TIMEOUT_MS,
        )
        links = page.eval_on_selector_all(
            "#search-results ul.search li a", "els => els.map(a => a.getAttribute('href'))"
        )
        assert any(href.split("?")[0].split("#")[0].endswith(expected_page) for href in links), (
            f"searching {query!r} did not find {expected_page}: {links}"
        )
        assert not log.blocked and not log.console_errors, (log.blocked, log.console_errors)
    finally:
        page.close()
