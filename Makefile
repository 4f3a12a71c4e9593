# Two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast lint typecheck demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[app,dev,integrations]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest -q

# the fast subset (under a minute on 2 cores): everything not marked slow
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# The main job: real MNIST, Caffe LeNet solver, SGD then ISGD, figures and a table.
DEMO_ITERS ?= 5000
DEMO_DIR   ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_DIR   := $(DEMO_DIR)
demo: $(STAMP)
	$(BIN)/isgd data fetch mnist
	$(BIN)/isgd train --preset lenet-mnist --optimizer sgd  --iters $(DEMO_ITERS) --out $(DEMO_DIR)/sgd
	$(BIN)/isgd train --preset lenet-mnist --optimizer isgd --iters $(DEMO_ITERS) --out $(DEMO_DIR)/isgd
	$(BIN)/isgd plot $(DEMO_DIR)/sgd $(DEMO_DIR)/isgd --out $(DEMO_DIR)/plots
	@echo "figures and table: $(DEMO_DIR)/plots   summaries: $(DEMO_DIR)/{sgd,isgd}/summary.json"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
