# medlens: two commands on a fresh machine.
#   make demo  - create .venv, install everything, run the main job on the embedded sample data
#   make test  - create .venv if missing, run ruff, mypy on src/ and pytest
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test lint typecheck pytest install clean

$(BIN)/medlens: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "medlens needs Python 3.11 ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first; every later requirement is satisfied by it, so no CUDA build is pulled.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	@$(BIN)/python -c "import sys, torch; ok = torch.__version__.startswith('2.13.0') and torch.version.cuda is None; print('torch', torch.__version__); sys.exit(0 if ok else 'medlens: a dependency replaced the CPU build of torch 2.13.0')"
	touch $(BIN)/medlens

# The web viewer of 'medlens serve' draws with NiiVue from npm (pinned in viewer/package-lock.json; no install
# scripts run). It is served from viewer/node_modules by the app: never fetched at run time.
viewer/node_modules/.package-lock.json: viewer/package.json viewer/package-lock.json
	@if command -v npm >/dev/null; then \
		cd viewer && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error; \
	else \
		echo "medlens: npm not found: the web viewer of 'medlens serve' needs it (apt-get install npm)"; \
	fi

install: $(BIN)/medlens viewer/node_modules/.package-lock.json

demo: install
	$(BIN)/medlens demo

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy src

pytest: install
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info
