# Developer and CI entry points. `make test` is the test command CI runs (.ci/run).
# Everything runs from the project's own .venv; `make venv` (re)installs it only when
# pyproject.toml is newer than the stamp, so repeated `make test` costs nothing extra.

PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := test
.PHONY: venv proto test run lint bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $@

proto: venv
	$(PY) -m proto.build

# pytest exits 5 when it collects no tests; that is a failure here, said plainly.
test: venv proto
	$(VENV)/bin/lint-imports
	@status=0; $(PY) -m pytest -q tests $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

run: venv proto
	$(VENV)/bin/inventory serve

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: venv proto
	$(PY) bench/reserve.py
