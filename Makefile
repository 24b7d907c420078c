# Two commands matter: `make serve` (build the demo if missing, then serve it) and `make test`.
# Every target creates .venv in the project root on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARTIFACTS ?= artifacts

.PHONY: serve test lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m cli demo build --artifacts $(ARTIFACTS)
	$(PY) -m cli serve --artifacts $(ARTIFACTS) --host 127.0.0.1 --port 8000

demo: $(STAMP)
	$(PY) -m cli demo build --artifacts $(ARTIFACTS)

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
