# Two entry points for a fresh machine: `make demo` and `make test` (both set everything up first).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo

.PHONY: setup demo test test-fast lint data

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/llava train output_dir=$(DEMO_OUT)

test: setup
	$(PY) -m pytest -q --timeout=1200 --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check llava_train tests benchmarks

data: setup
	$(PY) -m llava_train.data.demo data/demo
