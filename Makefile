# Two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-numerics test-fast lint typecheck demo bench clean

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
	$(MAKE) --no-print-directory test-numerics

# The numerics subset (lockstep with the reference, bit-identity, resume) once more under each
# CPU kernel family torch can dispatch to besides the native one, so that no tolerance that
# only one CPU meets can land (an AVX-512 Xeon rounds float32 differently from an AVX2 EPYC).
KERNELS ?= default avx2
test-numerics: $(STAMP)
	@for k in $(KERNELS); do \
	  echo "numerics under ATEN_CPU_CAPABILITY=$$k"; \
	  ATEN_CPU_CAPABILITY=$$k $(BIN)/pytest -q -m numerics || exit 1; \
	done

# the fast subset: everything not marked slow
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# The main job: real MNIST, Caffe LeNet solver, SGD then ISGD, figures and a table.
# One torch thread per run: two threads wait for each other whenever anything else uses a core
# (5x slower here under load; docs/results.md, claim C4), one thread degrades only in proportion.
DEMO_ITERS   ?= 5000
DEMO_THREADS ?= 1
DEMO_DIR     ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_DIR     := $(DEMO_DIR)
DEMO_TRAIN   := $(BIN)/isgd train --preset lenet-mnist --iters $(DEMO_ITERS) --threads $(DEMO_THREADS)
demo: $(STAMP)
	$(BIN)/isgd data fetch mnist
	@echo "demo run 1 of 2: SGD, $(DEMO_ITERS) iterations (the ETA shown is this run's; run 2 takes about as long)"
	$(DEMO_TRAIN) --optimizer sgd  --out $(DEMO_DIR)/sgd
	@echo "demo run 2 of 2: ISGD, $(DEMO_ITERS) iterations"
	$(DEMO_TRAIN) --optimizer isgd --out $(DEMO_DIR)/isgd
	$(BIN)/isgd plot $(DEMO_DIR)/sgd $(DEMO_DIR)/isgd --out $(DEMO_DIR)/plots
	@echo "figures and table: $(DEMO_DIR)/plots (compare the runs on accuracy_vs_passes.png;"
	@echo "  accuracy_vs_time.png is wall-clock time of two separate runs)   summaries: $(DEMO_DIR)/{sgd,isgd}/summary.json"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
