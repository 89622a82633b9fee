"""Fixtures of the end-to-end tests: one throw-away JupyterLab server and one headless Chromium per session.

Run them alone with ``make e2e`` (or ``python -m pytest tests/e2e``). What they need:

- Chromium (Debian's ``chromium`` package; ``chromium-browser`` / ``google-chrome`` are found too, or set
  ``EFFEDU_E2E_CHROMIUM=/path/to/binary``). When it is missing and we are root on Debian/Ubuntu with apt, the
  session installs it (``apt-get install -y chromium``); otherwise every test is skipped with what to install.
- The ``playwright`` Python package (test extra). Its own browser download (``playwright install``) is never
  used: Playwright drives the system Chromium.
- With ``CI=true`` a missing Chromium or Playwright is a failure, never a skip.

Environment knobs: ``EFFEDU_E2E_TIMEOUT`` (seconds for "run all" of one notebook, default 600),
``EFFEDU_E2E_SCREENSHOTS`` (where the explorer screenshots go, default ``docs/screenshots``),
``EFFEDU_E2E_NOTEBOOK_DIR`` (test the notebooks of another folder, e.g. to check the harness itself).

Teardown is by handle and runs when a test fails too: the notebook's kernel (REST), the browser (Playwright),
then every kernel (REST), the server (``/api/shutdown``, then its process group) and, last resort, processes that
carry this session's environment marker.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _lab  # noqa: E402

PLAYWRIGHT_PIN = "playwright>=1.45,<1.66"
FAILURE_DIR = pathlib.Path(__file__).resolve().parent / "screenshots-tmp"  # git-ignored; full page at a failure


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test in JupyterLab + headless Chromium (tests/e2e; `make e2e`; needs chromium + playwright)",
    )


def _missing(message):
    """Skip, or fail under CI=true, with the exact message of what is missing."""
    if _lab.in_ci():
        pytest.fail(f"{message} (CI=true: a missing browser dependency is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


# ---------------------------------------------------------------------------------------------------------------
# Timing report
# ---------------------------------------------------------------------------------------------------------------

TIMINGS = _lab.TIMINGS  # {notebook stem: {phase: seconds}}, filled by the test
TIMINGS_SESSION = _lab.TIMINGS_SESSION


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    tr = terminalreporter
    tr.write_sep("-", "e2e timings in seconds ('cells': the cells' own run time as JupyterLab recorded it; "
                      "'overhead' = total - cells)")
    head = (f"{'notebook':38s} {'open':>6s} {'run all':>8s} {'cells':>7s} {'explore':>8s} {'total':>7s} "
            f"{'overhead':>8s}  slowest cell")
    tr.write_line(head)
    total = 0.0
    for name, t in TIMINGS.items():
        total += t.get("total", 0.0)
        tr.write_line(
            f"{name:38s} {t.get('open', float('nan')):6.1f} {t.get('run_all', float('nan')):8.1f} "
            f"{t.get('cells', float('nan')):7.1f} {t.get('explore', float('nan')):8.1f} {t.get('total', 0.0):7.1f} "
            f"{t.get('total', 0.0) - t.get('cells', float('nan')):8.1f}  "
            + (f"#{t['slowest'][0]} {t['slowest'][1]:.1f}" if t.get("slowest") and t["slowest"][0] is not None else "")
            + (f"  (slider: {t['moved']})" if t.get("moved") else "")
            + (f"  ({t['moves']} control moves in {t['controls']:.1f} s)" if t.get("moves") else "")
            + (f"  ({t['checks']} checks failed on their stubs)" if t.get("checks") else "")
        )
    setup = TIMINGS_SESSION.get("setup")
    extra = f"; session set-up (server + browser) {setup:.1f} s" if setup is not None else ""
    tr.write_line(f"{len(TIMINGS)} notebooks: {total:.1f} s in the tests{extra}")



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"e2e_rep_{report.when}", report)


# ---------------------------------------------------------------------------------------------------------------
# Dependencies: Chromium and Playwright
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium_executable(pytestconfig):
    path = _lab.find_chromium()
    if path:
        return path
    explicit = os.environ.get(_lab.CHROMIUM_ENV)
    if explicit:
        _missing(f"{_lab.CHROMIUM_ENV}={explicit} is not an executable file; {_lab.INSTALL_HINT}")
    if _lab.can_apt_install():
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("\n[e2e] Chromium not found: installing it with `apt-get install -y chromium` …")
        ok, log = _lab.apt_install_chromium()
        if ok:
            return _lab.find_chromium()
        _missing(f"Chromium is missing and `apt-get install -y chromium` did not provide it:\n{log}")
    _missing(f"Chromium is missing (looked for {', '.join(_lab.CHROMIUM_CANDIDATES)} and on PATH): "
             f"{_lab.INSTALL_HINT}")


@pytest.fixture(scope="session")
def playwright_factory():
    try:
        from playwright.sync_api import sync_playwright as factory
    except ImportError as exc:
        _missing(
            f"the Python package playwright is missing ({exc}): install it into this environment with "
            f"`{sys.executable} -m pip install '{PLAYWRIGHT_PIN}'` (or `pip install -e '.[test]'`); do not run "
            f"`playwright install`, the tests drive the system Chromium"
        )
    return factory


# ---------------------------------------------------------------------------------------------------------------
# Server, browser, page
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def lab_server(e2e_root, chromium_executable, playwright_factory, pytestconfig):
    """JupyterLab on a free loopback port with a random token, serving a temporary folder of notebook copies."""
    started = time.monotonic()
    notebook_dir = e2e_root / "notebooks"
    notebook_dir.mkdir()
    server = _lab.LabServer(e2e_root, notebook_dir)
    pytestconfig.add_cleanup(server.stop)  # also after Ctrl-C, when fixture teardown may not run; stop() is idempotent
    try:
        server.start()
        TIMINGS_SESSION["server"] = time.monotonic() - started
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser(lab_server, chromium_executable, playwright_factory):
    started = time.monotonic()
    manager = playwright_factory().start()
    try:
        browser = manager.chromium.launch(
            executable_path=chromium_executable,
            headless=True,
            chromium_sandbox=not _lab.is_root(),  # Playwright adds --no-sandbox exactly when this is False
            args=_lab.CHROMIUM_ARGS,
            env=lab_server.env,  # HOME and XDG folders in the temporary directory
            timeout=60_000,
        )
        try:
            TIMINGS_SESSION["browser"] = time.monotonic() - started
            yield browser
        finally:
            browser.close()
    finally:
        manager.stop()


@pytest.fixture(scope="session")
def lab_session(browser, lab_server):
    started = time.monotonic()
    lab = _lab.LabPage(browser, lab_server).fresh()
    TIMINGS_SESSION["page"] = time.monotonic() - started
    TIMINGS_SESSION["setup"] = sum(TIMINGS_SESSION.get(k, 0.0) for k in ("server", "browser", "page"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def lab(lab_session, lab_server, request):
    """The session's JupyterLab page for one notebook; its kernel is shut down afterwards, pass or fail.

    After a failure the full page is saved to tests/e2e/screenshots-tmp/<test id>.png and the next test gets a
    freshly loaded page.
    """
    if lab_session.page is None:
        lab_session.fresh()
    lab_session.console_errors.clear()
    lab_session.error_cells = set()
    yield lab_session
    failed = any(
        getattr(getattr(request.node, f"e2e_rep_{when}", None), "failed", False) for when in ("setup", "call")
    )
    if failed and lab_session.page is not None:
        FAILURE_DIR.mkdir(exist_ok=True)
        name = request.node.name.replace("/", "_").replace("[", "-").rstrip("]")
        try:
            lab_session.page.screenshot(path=str(FAILURE_DIR / f"{name}.png"), full_page=False, timeout=10_000)
        except Exception:  # the page may be the thing that broke
            pass
        # shown in the report's "Captured stdout teardown" section
        print(f"[e2e] page saved to {FAILURE_DIR / (name + '.png')}")
        if lab_session.console_errors:
            print("[e2e] browser console errors:\n  " + "\n  ".join(lab_session.console_errors[-20:]))
        print(f"[e2e] end of the server log ({lab_server.log_path}):\n{lab_server.log_tail(2000)}")
    lab_session.close_notebook()
    lab_server.shutdown_kernels()
    if failed:
        lab_session.close()  # the next test reloads JupyterLab from scratch
