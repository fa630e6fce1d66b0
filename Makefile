# Each target installs what it needs into .venv (created if missing) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-all clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## The main job: synthetic benchmark -> base -> vanilla -> unlearning methods -> evaluation -> report
## (cached stages are reused; the report lands in runs/reports/).
demo: $(STAMP)
	$(VENV)/bin/vleraser demo

## The test suite (a few minutes on 2 CPU cores).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## Only the tests marked slow (exit code 5, "none collected", is fine).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow || test $$? -eq 5

## Everything, including tests marked slow.
test-all: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
