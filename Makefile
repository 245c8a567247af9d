# Two commands a new user needs:  `make demo` (set up, then fine-tune the embedded demo)
# and `make test` (set up, then run the test suite). Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so a CPU-only machine with a local torch 2.13.0 CPU wheel takes it instead of a multi-GB
# CUDA build; on a GPU machine `make setup TORCH="torch==2.13.0"` (the default) gets PyPI's CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# Tests run two at a time, a test file per worker (its module fixtures built once): most of a test's time is a
# subprocess importing libraries on one core, so two keep a 2-core machine busy. TEST_WORKERS=0: one at a time.
TEST_WORKERS ?= 2

.PHONY: setup demo test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# DeepSpeed compiles two CPU ops the first time a launch needs them; the tests launch it many times.
$(VENV)/.deepspeed-ops: $(VENV)/.installed
	$(PY) scripts/prebuild_deepspeed_ops.py
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/train.py

test: setup $(VENV)/.deepspeed-ops
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
