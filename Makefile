# Every target creates the virtualenv on first use, so a fresh clone needs one command.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: train test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# PYTHONWARNINGS: setuptools' notice about editable installs is not the newcomer's first screen.
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/metarl train --config experiments/promp_point_nav.yaml --out runs/promp_point_nav --force
	@echo "Results: runs/promp_point_nav/metrics.jsonl (configuration in runs/promp_point_nav/config.yaml)"

# Two workers: the suite is compile-bound and XLA compiles on one thread.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# BENCH_ARGS passes options through, e.g. make bench BENCH_ARGS="--algos maml-trpo".
bench: $(STAMP)
	$(BIN)/python benchmarks/meta_iteration.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .jax_cache runs
