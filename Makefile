# Wingbeat. `make demo` and `make test` are all a newcomer needs; both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := ../shared/data

.PHONY: demo test test-fast lint bench headtohead clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned to the CPU wheel on this disk; the project's range admits it, so nothing else comes
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wingbeat demo

test: $(STAMP)
	$(BIN)/ruff check model daemon tests bench
	$(BIN)/ruff format --check model daemon tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check model daemon tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/train_speed.py

headtohead: $(STAMP)
	$(BIN)/python bench/headtohead.py

clean:
	rm -rf $(VENV) out
