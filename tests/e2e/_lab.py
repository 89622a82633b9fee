"""Helpers of the end-to-end tests: Chromium discovery, a throw-away JupyterLab server, page-state probes.

Everything here is driven by handles the tests own: the server is a process group we started, its kernels are
shut down through its REST API, the browser is a Playwright handle. Nothing is written to the home folder: the
server, its kernels and the browser get ``HOME``, the Jupyter/IPython/matplotlib folders and the XDG folders in
a temporary directory.

The page is probed through ``window.jupyterapp`` (exposed with ``--LabApp.expose_app_in_browser``): the notebook
model and the kernel connection are the page's state; DOM markers (the ``[*]`` prompt, the toolbar's kernel
indicator) are checked as well, never alone. Every JavaScript snippet returns at once — a Playwright
``evaluate`` that awaits a never-settling promise has no timeout — and all waiting happens in Python loops with
deadlines and a message saying what the page looked like when time ran out.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
# the chapters; EFFEDU_E2E_NOTEBOOK_DIR points the suite at another folder (used to test the harness itself)
NOTEBOOK_DIR = pathlib.Path(os.environ.get("EFFEDU_E2E_NOTEBOOK_DIR", REPO / "notebooks"))
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"

TIMINGS: dict[str, dict] = {}  # per notebook {phase: seconds}, reported at the end of the session
TIMINGS_SESSION: dict[str, float] = {}  # server, browser, first page

# ---------------------------------------------------------------------------------------------------------------
# Chromium and Playwright: find, install (root + apt), or say exactly what is missing
# ---------------------------------------------------------------------------------------------------------------

CHROMIUM_CANDIDATES = (
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
    "/usr/bin/google-chrome-stable",
)
CHROMIUM_ENV = "EFFEDU_E2E_CHROMIUM"  # an explicit browser binary wins over the list above
CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often mount a 64 MB /dev/shm
]
INSTALL_HINT = (
    "install Chromium: `sudo apt-get install -y chromium` (Debian; `chromium-browser` on older Ubuntu), or point "
    f"{CHROMIUM_ENV}=/path/to/chrome at a Chromium/Chrome binary"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def find_chromium() -> str | None:
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _debian_like() -> bool:
    try:
        text = pathlib.Path("/etc/os-release").read_text()
    except OSError:
        return pathlib.Path("/etc/debian_version").exists()
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    ids = (fields.get("ID", "") + " " + fields.get("ID_LIKE", "")).replace('"', "").split()
    return bool({"debian", "ubuntu"} & set(ids))


def can_apt_install() -> bool:
    return is_root() and _debian_like() and shutil.which("apt-get") is not None


def apt_install_chromium(timeout: float = 900) -> tuple[bool, str]:
    """``apt-get install -y chromium`` (after ``apt-get update`` if the package lists are stale); (ok, log tail)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []

    def run(*cmd):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.append(f"$ {' '.join(cmd)} -> {exc}")
            return 1
        log.append(f"$ {' '.join(cmd)} -> exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-1500:]}")
        return proc.returncode

    if run("apt-get", "install", "-y", "chromium") != 0 or not find_chromium():
        run("apt-get", "update")
        run("apt-get", "install", "-y", "chromium")
    return find_chromium() is not None, "\n".join(log)


# ---------------------------------------------------------------------------------------------------------------
# A throw-away JupyterLab server
# ---------------------------------------------------------------------------------------------------------------

# JupyterLab settings overrides for the test server (its own app_settings_dir): no news, no update check, no
# autosave of the notebook copies, no toast that could cover the page.
SETTINGS_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
    "@jupyterlab/docmanager-extension:plugin": {"autosave": False},
    "@jupyterlab/notebook-extension:tracker": {
        "recordTiming": True,  # per-cell times for the report
        # every cell laid out for real: with the default "contentVisibility" the cells above the explorer get
        # their true height only as they scroll into view, and the explorer moves under the screenshot
        "windowingMode": "none",
    },
}
# front-end plugins that only talk to the internet or pop up over the page
DISABLED_EXTENSIONS = [
    "@jupyterlab/apputils-extension:announcements",
    "@jupyterlab/extensionmanager-extension",
]
SERVER_MARK = "EFFEDU_E2E_SERVER"  # env marker inherited by the server and its kernels (last-resort cleanup)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_env(root: pathlib.Path) -> dict:
    """Environment whose home, Jupyter, IPython, matplotlib and XDG folders all lie under ``root``."""
    dirs = {
        "HOME": "home",
        "JUPYTER_RUNTIME_DIR": "runtime",
        "JUPYTER_CONFIG_DIR": "config",
        "JUPYTER_DATA_DIR": "data",
        "JUPYTERLAB_SETTINGS_DIR": "lab-user-settings",
        "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces",
        "IPYTHONDIR": "ipython",
        "MPLCONFIGDIR": "matplotlib",
        "XDG_CONFIG_HOME": "xdg-config",
        "XDG_CACHE_HOME": "xdg-cache",
        "XDG_DATA_HOME": "xdg-data",
        "TMPDIR": "tmp",  # ipykernel's cell files, torch/numba temporaries
    }
    env = dict(os.environ)
    for var, name in dirs.items():
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


class LabServer:
    """``jupyter lab`` on 127.0.0.1:<free port> with a random token, serving ``notebook_dir``; stop() by handle."""

    def __init__(self, root: pathlib.Path, notebook_dir: pathlib.Path):
        self.root = root
        self.notebook_dir = notebook_dir
        self.token = secrets.token_hex(24)
        self.port = None
        self.proc = None
        self.log_path = root / "jupyter-lab.log"
        self.env = isolated_env(root)
        self.mark = secrets.token_hex(8)  # unique per session; inherited by the server's kernels
        self.env[SERVER_MARK] = self.mark

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self):
        app_settings = self.root / "lab-app-settings"
        app_settings.mkdir(exist_ok=True)
        (app_settings / "overrides.json").write_text(json.dumps(SETTINGS_OVERRIDES, indent=1))
        labconfig = pathlib.Path(self.env["JUPYTER_CONFIG_DIR"]) / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(
            json.dumps({"disabledExtensions": {name: True for name in DISABLED_EXTENSIONS}}, indent=1)
        )
        return app_settings

    def start(self, timeout: float = 60):
        app_settings = self._write_config()
        last_error = ""
        for _ in range(3):  # a free port can be taken between free_port() and the bind: try another
            self.port = free_port()
            cmd = [
                sys.executable, "-m", "jupyterlab",
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.notebook_dir}",
                "--ServerApp.terminals_enabled=False",
                f"--LabApp.app_settings_dir={app_settings}",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ]
            if is_root():
                cmd.append("--allow-root")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd, cwd=self.notebook_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,  # own process group: stop() kills it all
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_error = f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}"
                    break
                with contextlib.suppress(OSError, ValueError):
                    if self.api("GET", "/api/status", timeout=2) is not None:
                        return self
                time.sleep(0.1)
            else:
                self.stop()
                raise RuntimeError(f"jupyter lab did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")
        raise RuntimeError(last_error)

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def api(self, method: str, path: str, body=None, timeout: float = 10):
        """One REST call with the token; the decoded JSON (None for an empty body)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def shutdown_kernels(self):
        """Delete every session and kernel through the REST API (the server kills each kernel's process group)."""
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            for session in self.api("GET", "/api/sessions") or []:
                with contextlib.suppress(OSError, urllib.error.URLError):
                    self.api("DELETE", f"/api/sessions/{session['id']}", timeout=20)
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            for kernel in self.api("GET", "/api/kernels") or []:
                with contextlib.suppress(OSError, urllib.error.URLError):
                    self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=20)

    def stop(self):
        """Kernels via REST, then the server's own shutdown, then its process group; leftovers by our env marker."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.shutdown_kernels()
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.api("POST", "/api/shutdown", timeout=5)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        kill_marked(SERVER_MARK, self.mark)
        self.proc = None


def kill_marked(var: str, value: str):
    """Kill processes (kernels, their children) whose environment holds ``var=value`` — ours only (Linux)."""
    needle = f"{var}={value}".encode()
    me = os.getpid()
    for entry in pathlib.Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue


# ---------------------------------------------------------------------------------------------------------------
# Page-state probes (each returns at once; the waiting is done in Python)
# ---------------------------------------------------------------------------------------------------------------

JS_APP_READY = """() => {
  const app = window.jupyterapp;
  return !!(app && app.shell && app.commands && app.commands.hasCommand('docmanager:open')
            && app.commands.hasCommand('notebook:run-all-cells') && document.querySelector('#jp-main-dock-panel'));
}"""

JS_OPEN = """(path) => {
  // start opening; the promise is deliberately not returned (we poll the shell instead)
  window.jupyterapp.commands.execute('docmanager:open', {path, factory: 'Notebook', kernel: {name: 'python3'}});
  return true;
}"""

# the state of the current notebook: document, kernel connection, execution progress, error outputs
JS_STATE = """(path) => {
  const app = window.jupyterapp;
  const w = app && app.shell.currentWidget;
  const s = {path: null};
  if (!w || !w.context || !w.sessionContext || !w.content || !w.content.widgets) return s;
  s.path = w.context.path;
  if (s.path !== path) return s;
  const sc = w.sessionContext;
  const k = sc.session && sc.session.kernel;
  s.docReady = w.context.isReady && w.isRevealed !== false;
  s.sessionReady = sc.isReady;
  s.kernelName = k ? k.name : null;
  s.connection = k ? k.connectionStatus : null;
  s.status = k ? k.status : null;
  s.display = sc.kernelDisplayStatus;
  s.pendingInput = sc.pendingInput;
  const ind = w.node.querySelector('.jp-Notebook-ExecutionIndicator');
  s.indicator = ind ? ind.getAttribute('data-status') : null;
  s.cells = w.content.widgets.length;
  const dlg = document.querySelector('.jp-Dialog');
  s.dialog = dlg ? (dlg.textContent || '').trim().slice(0, 300) : null;
  s.code = 0; s.running = []; s.missing = []; s.errors = []; s.stale = [];
  w.content.widgets.forEach((c, i) => {
    if (c.model.type !== 'code') return;
    s.code += 1;
    const src = c.model.sharedModel.getSource();
    const prompt = c.promptNode ? c.promptNode.textContent : '';
    if (prompt.includes('*') || c.model.executionState === 'running') {
      if (!s.running.length) s.head = src.trim().split('\\n')[0].slice(0, 80);
      s.running.push(i);
    }
    if (src.trim() && c.model.executionCount == null) s.missing.push(i);
    if (c.model.executionCount != null || c.model.outputs.length) s.stale.push(i);
    const ex = c.model.getMetadata ? c.model.getMetadata('execution') : null;
    if (ex && ex['iopub.status.busy'] && ex['shell.execute_reply']) {
      s.times = s.times || {};
      s.times[i] = (Date.parse(ex['shell.execute_reply']) - Date.parse(ex['iopub.status.busy'])) / 1000;
    }
    for (const o of c.model.outputs.toJSON()) {
      if (o.output_type === 'error') s.errors.push({cell: i, ename: o.ename, evalue: String(o.evalue).slice(0, 300)});
    }
  });
  return s;
}"""

JS_CLEAR_AND_RUN_ALL = """(what) => {
  const app = window.jupyterapp;
  // by command id: the label "Run All Cells" also matches "Restart Kernel and Run All"; never await the result
  app.commands.execute(what);
  return true;
}"""

# DOM view of error outputs: a traceback in a stderr-typed output, or an error output rendered with its ename;
# ``skip``: indices of cells whose errors are expected (the exercises of a student copy), left out
JS_DOM_ERRORS = """(skip) => {
  const w = window.jupyterapp.shell.currentWidget;
  const out = [];
  const ename = /^\\s*[A-Za-z_][\\w.]*(Error|Exception|Interrupt|Exit)\\b.*$/m;
  const skipped = new Set((skip || []).map((i) => w.content.widgets[i] && w.content.widgets[i].node).filter(Boolean));
  for (const el of w.node.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], .jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')) {
    const cell = el.closest('.jp-Cell');
    if (cell && skipped.has(cell)) continue;
    const t = el.textContent || '';
    if (t.includes('Traceback (most recent call last)') || (ename.test(t) && !/Warning:/.test(t.match(ename)[0]))) {
      out.push(t.slice(0, 600));
    }
  }
  return out;
}"""

# marks the explorer's cell (the one whose source calls widgets.explorer) and reports how its output renders;
# ``problems``: any output on the page that is a widget shown as text (the text/plain fallback JupyterLab uses
# when the widget renderer is missing) or the widget manager's "Error displaying widget"
JS_EXPLORER = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const repr = /^\\s*(Explorer|VBox|HBox|IntSlider|FloatSlider|Dropdown|Checkbox|Output|IntProgress|FloatProgress)\\(/;
  const problems = [];
  const found = [];
  w.content.widgets.forEach((c, i) => {
    if (c.model.type !== 'code') return;
    for (const el of c.node.querySelectorAll('.jp-OutputArea-output')) {
      const t = el.textContent || '';
      if (t.includes('Error displaying widget')) problems.push({cell: i, text: t.trim().slice(0, 200)});
      else if (el.getAttribute('data-mime-type') === 'text/plain' && (repr.test(t) || t.includes('IntSlider(value=')))
        problems.push({cell: i, text: t.trim().slice(0, 200)});
    }
    if (/\\bexplorer\\(/.test(c.model.sharedModel.getSource())) {
      c.node.setAttribute('data-e2e-explorer', String(found.length));
      found.push(i);
    }
  });
  const explorers = found.map((i) => {
    const outArea = w.content.widgets[i].node.querySelector('.jp-Cell-outputArea');
    const img = outArea && outArea.querySelector('.jupyter-widgets img');
    return {
      cell: i,
      outputs: outArea ? outArea.querySelectorAll('.jp-OutputArea-output').length : 0,
      widgets: outArea ? outArea.querySelectorAll('.jupyter-widgets').length : 0,
      sliders: outArea ? outArea.querySelectorAll('.widget-slider').length : 0,
      handles: outArea ? outArea.querySelectorAll('.widget-slider .noUi-handle').length : 0,
      imgComplete: !!(img && img.complete && img.naturalWidth > 0),
    };
  });
  return {explorers, problems};
}"""

# a short fingerprint of the explorer's image (the PNG is replaced as a whole when the plot re-runs)
JS_EXPLORER_IMAGE = """(n) => {
  const node = document.querySelector(`[data-e2e-explorer="${n}"] .jp-Cell-outputArea`);
  if (!node) return null;
  const imgs = node.querySelectorAll('.jupyter-widgets img');
  if (!imgs.length) return {count: 0};
  const img = imgs[imgs.length - 1];
  const src = img.getAttribute('src') || '';
  let h = 0;
  for (let i = 0; i < src.length; i += 1) h = (h * 31 + src.charCodeAt(i)) | 0;
  return {count: imgs.length, len: src.length, hash: h, complete: img.complete && img.naturalWidth > 0};
}"""

# how wide the explorer's content is, measured from its left edge (the VBox spans the whole notebook width; the
# controls and the figure often do not); independent of scrolling
JS_EXPLORER_CONTENT_WIDTH = """(n) => {
  const vbox = document.querySelector(`[data-e2e-explorer="${n}"] .jp-Cell-outputArea .jupyter-widgets.widget-vbox`);
  if (!vbox) return null;
  const r = vbox.getBoundingClientRect();
  let right = r.left;
  for (const el of vbox.querySelectorAll('.widget-inline-hbox, .widget-html, .widget-output img')) {
    const b = el.getBoundingClientRect();
    if (b.width > 0) right = Math.max(right, b.right);
  }
  return {content: right - r.left, full: r.width};
}"""

JS_SLIDER_INFO = """(n) => {
  const sliders = document.querySelectorAll(`[data-e2e-explorer="${n}"] .widget-slider`);
  return Array.from(sliders).map((s) => {
    const h = s.querySelector('.noUi-handle');
    const label = s.querySelector('.widget-label');
    const readout = s.querySelector('.widget-readout');
    return {label: label ? label.textContent : '', readout: readout ? readout.textContent : '',
            now: h ? h.getAttribute('aria-valuenow') : null, max: h ? h.getAttribute('aria-valuemax') : null,
            min: h ? h.getAttribute('aria-valuemin') : null};
  });
}"""

# every control of explorer n that the learner can see (a depends= rule may hide some): sliders, dropdowns,
# checkboxes, in page order, with what a move needs (the slider's value and range, the dropdown's options)
JS_CONTROLS = """(n) => {
  const root = document.querySelector(`[data-e2e-explorer="${n}"] .jp-Cell-outputArea`);
  if (!root) return [];
  const visible = (el) => !!(el.offsetParent) && el.getBoundingClientRect().width > 0;
  const out = [];
  const kinds = [['slider', '.widget-slider'], ['dropdown', '.widget-dropdown'], ['checkbox', '.widget-checkbox']];
  for (const [kind, sel] of kinds) {
    root.querySelectorAll(sel).forEach((el, index) => {
      if (!visible(el)) return;
      const label = el.querySelector('.widget-label');
      const c = {kind, index, label: label ? label.textContent.trim() : ''};
      if (kind === 'slider') {
        const h = el.querySelector('.noUi-handle');
        c.now = h ? h.getAttribute('aria-valuenow') : null;
        c.min = h ? h.getAttribute('aria-valuemin') : null;
        c.max = h ? h.getAttribute('aria-valuemax') : null;
        const r = el.querySelector('.widget-readout');
        c.readout = r ? r.textContent : '';
      } else if (kind === 'dropdown') {
        const s = el.querySelector('select');
        c.options = s ? Array.from(s.options).map((o) => o.textContent) : [];
        c.now = s ? s.selectedIndex : null;
      } else {
        const i = el.querySelector('input[type="checkbox"]');
        c.now = i ? i.checked : null;
      }
      out.push(c);
    });
  }
  return out;
}"""

JS_CLOSE_CURRENT = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  if (!w) return false;
  if (w.context && w.context.model) w.context.model.dirty = false;  // no "save your work?" dialog
  w.dispose();
  return true;
}"""


# ---------------------------------------------------------------------------------------------------------------
# The steps of a learner's visit, each waiting on page state with a deadline
# ---------------------------------------------------------------------------------------------------------------


class PageStateTimeout(AssertionError):
    pass


def _short(state: dict) -> dict:
    """A page state trimmed for an error message."""
    keep = ("path", "sessionReady", "kernelName", "connection", "status", "display", "indicator", "dialog",
            "running", "head", "missing", "errors")
    out = {k: state.get(k) for k in keep if k in state}
    for k in ("running", "missing"):
        if isinstance(out.get(k), list) and len(out[k]) > 12:
            out[k] = out[k][:12] + ["…"]
    return out


class LabPage:
    """One browser page on the lab server, reused from notebook to notebook (reloaded after a failure)."""

    SETTLE = 2.0  # seconds the kernel stays idle, nothing running, before a run with an error counts as finished

    def __init__(self, browser, server: LabServer, viewport=(1280, 900)):
        self.browser = browser
        self.server = server
        self.viewport = viewport
        self.page = None
        self.console_errors: list[str] = []
        self.error_cells: set[int] = set()  # cells of the current notebook whose error outputs are expected

    # -- the page -------------------------------------------------------------------------------------------
    def fresh(self, timeout: float = 60):
        """Close the current page (if any) and load JupyterLab with an empty workspace."""
        self.close()
        context = self.browser.new_context(viewport={"width": self.viewport[0], "height": self.viewport[1]},
                                           device_scale_factor=1)
        self.page = context.new_page()
        self.page.set_default_timeout(30_000)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        self.page.goto(f"{self.server.url}/lab?reset&token={self.server.token}", wait_until="domcontentloaded",
                       timeout=timeout * 1000)
        self.page.wait_for_function(JS_APP_READY, timeout=timeout * 1000, polling=100)
        # more room for the notebook: collapse the side panels (the file browser opens on the left)
        self.page.evaluate("() => { const s = window.jupyterapp.shell; s.collapseLeft(); s.collapseRight(); }")
        return self

    def _on_console(self, msg):
        if msg.type == "error":
            self.console_errors.append(msg.text[:500])

    def close(self):
        if self.page is not None:
            with contextlib.suppress(Exception):
                self.page.context.close()
        self.page = None

    def evaluate(self, js, arg=None):
        return self.page.evaluate(js, arg)

    def state(self, path):
        return self.page.evaluate(JS_STATE, path)

    def wait(self, path, done, what, timeout, interval=0.1, fail=None):
        """Poll the notebook's state until ``done(state)``; raise with the last state (or at ``fail(state)``)."""
        deadline = time.monotonic() + timeout
        state = {}
        while True:
            state = self.state(path)
            if done(state):
                return state
            problem = fail(state) if fail else None
            if problem:
                raise AssertionError(f"{path}: {what}: {problem}; page state: {_short(state)}")
            if time.monotonic() > deadline:
                raise PageStateTimeout(
                    f"{path}: {what} not reached within {timeout:.0f} s; page state: {_short(state)}"
                )
            self.page.wait_for_timeout(interval * 1000)

    # -- a notebook -----------------------------------------------------------------------------------------
    @staticmethod
    def _kernel_trouble(state):
        if state.get("dialog"):
            return f"a dialog is open: {state['dialog']!r}"
        if state.get("status") in ("dead", "autorestarting", "restarting"):
            return f"the kernel is {state['status']}"
        return None

    def open_notebook(self, path, timeout: float = 90):
        """Open ``path`` and wait until its kernel is connected and idle (page state, then the toolbar too)."""
        self.page.evaluate(JS_OPEN, path)

        def ready(s):
            return (s.get("path") == path and s.get("docReady") and s.get("sessionReady")
                    and s.get("kernelName") == "python3" and s.get("connection") == "connected"
                    and s.get("status") == "idle" and s.get("display") == "idle"
                    and s.get("indicator") in (None, "idle"))

        return self.wait(path, ready, "kernel connected and idle", timeout, fail=self._kernel_trouble)

    def run_all(self, path, timeout: float):
        """Clear every output, then run all cells by command id; wait until nothing runs and the kernel is idle.

        Returns the final state. Stops early (without timing out) when a cell raised and nothing runs any more:
        JupyterLab does not run the cells after an error, except after a cell tagged ``raises-exception`` (sent
        with ``stop_on_error=False``: the exercises of a student copy), where it goes on; the cells it skipped stay
        in ``missing``.
        """
        self.page.evaluate(JS_CLEAR_AND_RUN_ALL, "notebook:clear-all-cell-outputs")
        self.wait(path, lambda s: not s.get("stale"), "all outputs cleared", 10)
        self.page.evaluate(JS_CLEAR_AND_RUN_ALL, "notebook:run-all-cells")

        idle_since = None

        def finished(s):
            # After a cell raised, JupyterLab marks every cell still queued as not running (its "Run All" promise
            # failed), yet after a raises-exception cell the kernel goes on executing them; between two of them
            # it is idle for milliseconds only. So with an error on the page and cells not executed, "finished"
            # needs the kernel idle, with nothing running, for SETTLE seconds in a row.
            nonlocal idle_since
            if s.get("running") or s.get("status") != "idle":
                idle_since = None
                return False
            if not s.get("missing"):
                return True
            if not s.get("errors"):
                return False  # the first cells may not be marked running yet right after the command
            now = time.monotonic()
            idle_since = now if idle_since is None else idle_since
            return now - idle_since >= self.SETTLE

        def trouble(s):
            if s.get("dialog"):
                return f"a dialog is open: {s['dialog']!r}"
            if s.get("status") in ("dead", "autorestarting"):
                return f"the kernel is {s['status']} (crashed or out of memory?)"
            return None

        return self.wait(path, finished, "all cells executed", timeout, interval=0.2, fail=trouble)

    def dom_errors(self, skip=None):
        """Error outputs shown on the page, except in the cells ``skip`` (indices; default ``self.error_cells``,
        the cells of the current notebook where an error is expected: a student copy's exercises)."""
        return self.page.evaluate(JS_DOM_ERRORS, sorted(self.error_cells if skip is None else skip))

    def explorers(self):
        return self.page.evaluate(JS_EXPLORER)

    def explorer_locator(self, n=0):
        return self.page.locator(f'[data-e2e-explorer="{n}"] .jp-Cell-outputArea .jupyter-widgets.widget-vbox').first

    def image(self, n=0):
        return self.page.evaluate(JS_EXPLORER_IMAGE, n)

    def sliders(self, n=0):
        return self.page.evaluate(JS_SLIDER_INFO, n)

    def wait_image_ready(self, n=0, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            img = self.image(n)
            if img and img.get("count") and img.get("complete"):
                return img
            if time.monotonic() > deadline:
                raise PageStateTimeout(f"explorer {n}: no rendered image within {timeout:.0f} s (last: {img})")
            self.page.wait_for_timeout(100)

    def move_slider(self, n=0):
        """Focus the first slider's handle and press ArrowRight (ArrowLeft when it sits at its maximum)."""
        infos = self.sliders(n)
        if not infos:
            raise AssertionError(f"explorer {n} has no slider")
        index = 0
        info = infos[index]
        at_max = info["now"] is not None and info["max"] is not None and float(info["now"]) >= float(info["max"])
        key = "ArrowLeft" if at_max else "ArrowRight"
        handle = self.page.locator(f'[data-e2e-explorer="{n}"] .widget-slider .noUi-handle').nth(index)
        handle.scroll_into_view_if_needed()
        handle.focus()
        handle.press(key)
        return info, key

    def controls(self, n=0):
        """The visible controls of explorer ``n`` (see ``JS_CONTROLS``)."""
        return self.page.evaluate(JS_CONTROLS, n)

    def move_control(self, n, control: dict, end: str):
        """Move one control to one end, as a learner does: a slider's handle with Home/End, a dropdown to its
        first/last option, a checkbox toggled. Returns a description of the move, or None when the control
        already sits there (nothing to redraw)."""
        base = f'[data-e2e-explorer="{n}"] .jp-Cell-outputArea'
        kind, index = control["kind"], control["index"]
        if kind == "slider":
            target = control["max"] if end == "max" else control["min"]
            if control["now"] is None or float(control["now"]) == float(target):
                return None
            handle = self.page.locator(f"{base} .widget-slider .noUi-handle").nth(index)
            handle.scroll_into_view_if_needed()
            handle.focus()
            handle.press("End" if end == "max" else "Home")
            return f"{control['label']} {control['readout']} -> {end}"
        if kind == "dropdown":
            last = len(control["options"]) - 1
            target = last if end == "max" else 0
            if last < 1 or control["now"] == target:
                return None
            select = self.page.locator(f"{base} .widget-dropdown select").nth(index)
            select.scroll_into_view_if_needed()
            select.select_option(index=target)
            return f"{control['label']} {control['options'][control['now']]!r} -> {control['options'][target]!r}"
        if kind == "checkbox":
            if (end == "max") == bool(control["now"]):
                return None
            box = self.page.locator(f'{base} .widget-checkbox input[type="checkbox"]').nth(index)
            box.scroll_into_view_if_needed()
            box.click()
            return f"{control['label']} {bool(control['now'])} -> {not control['now']}"
        raise AssertionError(f"unknown control kind {kind!r}")

    def wait_image_changed(self, before: dict, path: str, n=0, timeout: float = 120, stable: float = 0.5):
        """Wait until the explorer's image differs from ``before`` and has not changed for ``stable`` seconds
        while the kernel is idle (each value change re-runs the plot function in the kernel)."""
        deadline = time.monotonic() + timeout
        last, since = None, None
        while True:
            img = self.image(n)
            now = time.monotonic()
            key = (img or {}).get("hash"), (img or {}).get("len")
            if img and img.get("count") and img.get("complete") and key != (before.get("hash"), before.get("len")):
                if key != last:
                    last, since = key, now
                elif now - since >= stable:
                    state = self.state(path)
                    if state.get("status") == "idle" and not state.get("running"):
                        return img
                    since = now  # still computing: the image may change again
            if not (img or {}).get("count"):  # the figure is gone: the plot function raised?
                errors = self.dom_errors()
                if errors:
                    raise AssertionError(f"{path}: after moving a slider the explorer shows an error: {errors}")
            if now > deadline:
                raise PageStateTimeout(
                    f"{path}: the explorer's image did not change (and settle) within {timeout:.0f} s after "
                    f"moving a slider; image now {img}, before {before}; page state: {_short(self.state(path))}"
                )
            self.page.wait_for_timeout(100)

    def screenshot_explorer(self, path, n=0, margin=12):
        """A PNG of the explorer (controls + figure), cropped on the right to its content.

        Playwright's element screenshot scrolls the explorer into view and waits until it stops moving (cells
        above it may still be laid out as they come into view); only the empty right-hand part is cut off.
        """
        png = self.explorer_locator(n).screenshot(animations="disabled")
        width = self.page.evaluate(JS_EXPLORER_CONTENT_WIDTH, n)
        path = pathlib.Path(path)
        try:
            from PIL import Image  # matplotlib's dependency, so present wherever the course runs
        except ImportError:
            path.write_bytes(png)
            return
        import io

        image = Image.open(io.BytesIO(png))
        if width and 0 < width["content"] + margin < image.width:
            image.crop((0, 0, int(width["content"] + margin), image.height)).save(path, optimize=True)
        else:
            path.write_bytes(png)

    def close_notebook(self):
        with contextlib.suppress(Exception):
            self.page.evaluate(JS_CLOSE_CURRENT)


def can_run() -> tuple[bool, str]:
    """Whether the browser tests can run here (Chromium found, Playwright importable); (ok, what is missing)."""
    missing = []
    if not find_chromium():
        missing.append(f"Chromium ({INSTALL_HINT})")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (`pip install -e '.[test]'`)")
    return not missing, "; ".join(missing)


if __name__ == "__main__":
    # `python tests/e2e/_lab.py --can-run` (make test): exit 0 when the browser tests can run, else 1 with why
    if sys.argv[1:] != ["--can-run"]:
        print("usage: python tests/e2e/_lab.py --can-run", file=sys.stderr)
        sys.exit(2)
    ok, why = can_run()
    if not ok:
        print(f"tests/e2e cannot run here: missing {why}")
    sys.exit(0 if ok else 1)
