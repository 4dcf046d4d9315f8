# The two commands: `make demo` and `make test`. Each sets up .venv first when needed.
VENV ?= .venv
# Test processes (pytest-xdist); each gets cores / TEST_JOBS torch threads (tests/conftest.py).
TEST_JOBS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vfmkd-installed

.PHONY: demo test test-fast bench setup clean

$(STAMP): pyproject.toml requirements.txt scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m vfmkd demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist worksteal

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_detection_training.py

clean:
	rm -rf runs .pytest_cache
