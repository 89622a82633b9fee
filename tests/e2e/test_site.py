"""The static site (``make site``, effedu.site) in headless Chromium, from ``file://`` with the network cut off:
the index and one chapter page load, MathJax (the site's local copy) typesets the math, every image decodes, no
request leaves the machine. Writes ``docs/screenshots/site_index.png`` and ``site_chapter.png``.

Chromium and Playwright are found as in the other browser tests (conftest.py: skipped with what to install, failed
under CI=true). The site is built into a temporary folder first (about 25–40 s)."""
from __future__ import annotations

import os
import pathlib
import re

import _lab
import pytest

from effedu import site

SCREENSHOTS = pathlib.Path(os.environ.get("EFFEDU_E2E_SCREENSHOTS", _lab.REPO / "docs" / "screenshots"))
CHAPTER = "01_transformer"  # math in its markdown, figures and an explorer in its outputs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    site.build_site(out, _lab.REPO / "notebooks")
    return out


@pytest.fixture(scope="module")
def page(browser):
    """A page of the session's Chromium (conftest's ``browser``: one Playwright per process — a second sync
    Playwright inside the first one's event loop is refused), offline, every http(s) request aborted."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    try:
        pg = context.new_page()
        pg.remote_requests = []
        pg.on("request", lambda req: pg.remote_requests.append(req.url)
              if not req.url.startswith(("file:", "data:", "about:", "blob:")) else None)
        pg.route(re.compile(r"^https?://"), lambda route: route.abort())
        yield pg
    finally:
        context.close()


def _open(page, path, math):
    page.remote_requests.clear()
    page.goto(path.resolve().as_uri(), wait_until="load", timeout=60_000)
    # MathJax 2 (the site's copy) loaded and its queue drained; on a page with math, typeset elements exist
    # (HTML-CSS output: span.MathJax)
    page.wait_for_function(
        """(math) => window.MathJax && MathJax.Hub && MathJax.Hub.queue && MathJax.Hub.queue.pending === 0
                 && !MathJax.Hub.queue.running
                 && (!math || document.querySelectorAll('.MathJax, .MathJax_CHTML, .MathJax_SVG').length > 0)""",
        arg=math, timeout=60_000)
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=30_000)


def _images(page):
    return page.evaluate("() => Array.from(document.images).map(i => [i.naturalWidth, (i.src || '').slice(0, 40)])")


def test_site_index_and_a_chapter_render_offline(site_dir, page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    _open(page, site_dir / "index.html", math=False)
    assert site.COURSE_TITLE in page.title() or site.COURSE_TITLE in page.inner_text("h1")
    links = page.evaluate("() => Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))")
    assert f"{CHAPTER}.html" in links and "syllabus.html" in links
    page.screenshot(path=str(SCREENSHOTS / "site_index.png"))
    assert not page.remote_requests, page.remote_requests

    _open(page, site_dir / f"{CHAPTER}.html", math=True)
    typeset = page.evaluate("() => document.querySelectorAll('.MathJax, .MathJax_CHTML, .MathJax_SVG').length")
    assert typeset > 0
    assert page.evaluate("() => document.querySelectorAll('.MathJax_Error, merror').length") == 0
    images = _images(page)
    assert len(images) >= 3, images
    assert all(w > 0 for w, _ in images), [src for w, src in images if w == 0]
    assert page.locator(".effedu-nav").count() >= 1
    assert page.locator(".effedu-explorer-caption").count() >= 1
    page.screenshot(path=str(SCREENSHOTS / "site_chapter.png"))
    assert not page.remote_requests, page.remote_requests
    assert (SCREENSHOTS / "site_index.png").stat().st_size > 10_000
    assert (SCREENSHOTS / "site_chapter.png").stat().st_size > 10_000
