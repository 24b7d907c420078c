# Two commands matter: `make serve` (build the demo if missing, then serve it) and `make test`.
# Every target creates .venv in the project root on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARTIFACTS ?= artifacts
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m cli demo build --artifacts $(ARTIFACTS)
	$(PY) -m cli serve --artifacts $(ARTIFACTS) --host $(HOST) --port $(PORT)

demo: $(STAMP)
	$(PY) -m cli demo build --artifacts $(ARTIFACTS)

test: $(STAMP) lint
	$(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
