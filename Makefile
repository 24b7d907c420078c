# Two commands matter: `make serve` (build the demo if missing, then serve it) and `make test`.
# Every target creates .venv in the project root on first use, from constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARTIFACTS ?= artifacts
HOST ?= 127.0.0.1
PORT ?= 8000
PYTHONS ?= 3.11 3.12 3.13

.PHONY: serve test test-fast lint demo check-pythons clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v <= (3, 13) else "expected Python 3.11, 3.12 or 3.13 as $(PYTHON), got %d.%d: make PYTHON=python3.12 ..." % v)'
	@echo "Installing cmh into $(VENV) at the versions CI tested (constraints.txt): a few minutes and about 7 GB the first time."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m cli demo build --artifacts $(ARTIFACTS)
	$(PY) -m cli serve --artifacts $(ARTIFACTS) --host $(HOST) --port $(PORT)

demo: $(STAMP)
	$(PY) -m cli demo build --artifacts $(ARTIFACTS)

# The full suite, as CI runs it.
test: $(STAMP) lint
	$(PY) -m pytest -q --durations=25

# The edit-test loop: every test not marked slow, no lint.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow' --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Install into a fresh venv per Python version (pyenv's, or python3.X on PATH) and run a smoke
# test: train a tiny model, build its index, serve it, search by text and by image.
check-pythons:
	.ci/check-pythons $(PYTHONS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
