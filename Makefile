# Set-up and the two entry points of the README: `make demo` and `make test`.
# Both create .venv from Python 3.12 (pyenv's, else python3.12 on PATH) and install ccajax into it.
PYTHON ?= $(shell command -v /root/.pyenv/versions/3.12.1/bin/python3.12 || command -v python3.12)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it or pass PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m experiments.demo

# One pytest-xdist worker per core, at most 4 (each holds its own JAX): on CI's 2 cores the
# suite took 852 s against 1,234 s in one process (2026-12-02).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n auto --maxprocesses=4 tests

clean:
	rm -rf $(VENV) .pytest_cache
