# Each target installs what it needs into .venv (created if missing) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two stamps: the demo needs only the runtime requirements; the tests add PyTorch, peft, pytest, ...
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: install install-test demo test test-slow test-all clean

$(RUNTIME): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(RUNTIME)

$(TESTING): $(RUNTIME) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(TESTING)

## The runtime requirements and the package (what `make demo` installs; no PyTorch).
install: $(RUNTIME)

## ... plus the test requirements (PyTorch, peft, tensorboardX, pytest, hypothesis).
install-test: $(TESTING)

## The main job: synthetic benchmark -> base -> oracle -> vanilla -> unlearning methods -> evaluation -> report
## (cached stages are reused; the report lands in runs/reports/).
demo: $(RUNTIME)
	$(VENV)/bin/vleraser demo

## The default test suite (8-11 minutes on 2 CPU cores).
test: $(TESTING)
	$(PY) -m pytest -q -m "not slow"

## Only the tests marked slow (exit code 5, "none collected", is fine).
test-slow: $(TESTING)
	$(PY) -m pytest -q -m slow || test $$? -eq 5

## Everything, including tests marked slow.
test-all: $(TESTING)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
