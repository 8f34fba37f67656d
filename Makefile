# Set-up and the everyday commands. Every target creates the virtual environment
# first, so `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
# The pinned torch wheels are built for Python 3.11.
PYTHON ?= $(shell command -v python3.11 || echo python3)
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[train,serve,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dcl demo

test: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
