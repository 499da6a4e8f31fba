# Two entry points for a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv, build the digits dataset, train a small model, sample
#   make test   set up .venv and run the test suite
# Both reuse the venv on later runs. TORCH_SPEC picks the torch build to install
# (the CPU default here; use e.g. TORCH_SPEC=torch for a CUDA machine's default build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup test demo clean-demo
.PRECIOUS: $(VENV)/.installed-%

# `make demo` installs the package with the demo's extra only, `make test` with
# the test extras as well; each stamp records one of them.
setup: $(VENV)/.installed-test

$(VENV)/.installed-%: setup.py
	@echo "==> setting up $(VENV) for $* (torch: $(TORCH_SPEC))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$*]"
	@touch $@
	@echo "==> $(VENV) is ready"

# The suite runs on every core, at most 8 (pytest-xdist; each test uses one thread; one file
# per worker at a time, so its trained fixtures are built once; files handed out in the order
# tests/conftest.py gives, the longest first), and ends with its 15 slowest tests;
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 8 --dist loadfile --no-loadscope-reorder --durations=15 tests

demo: $(VENV)/.installed-demo
	bash scripts/demo.sh $(PY)

clean-demo:
	rm -rf runs/demo data/digits
