# `make run`: self-check and benchmark on whatever device is here.  `make test`: the test suite.
# Both create .venv on a fresh machine. The venv sees system site-packages, so a machine that
# already has torch (a GPU image) keeps its own build; elsewhere the CPU build is installed.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyflash-installed
export PYTHONPATH := $(CURDIR)/src

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): Makefile
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch, triton" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0" "triton==3.6.0"
	$(PY) -c "import numpy, pytest, xdist" 2>/dev/null || $(PY) -m pip install -q "numpy<2.4" pytest pytest-xdist
	touch $(STAMP)

# BENCH_ARGS picks a benchmark subset, e.g. make run BENCH_ARGS="--head-dims 128 --mode fwd"
BENCH_ARGS ?=

run: $(STAMP)
	$(PY) -m pyflash.selfcheck $(if $(BENCH_ARGS),-- $(BENCH_ARGS))

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV)
