# Two entry points for a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv, build the digits dataset, train a small model, sample
#   make test   set up .venv and run the test suite
# Both reuse the venv on later runs. TORCH_SPEC picks the torch build to install
# (the CPU default here; use e.g. TORCH_SPEC=torch for a CUDA machine's default build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean-demo

setup: $(STAMP)

$(STAMP): setup.py
	@echo "==> setting up $(VENV) (torch: $(TORCH_SPEC))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,demo]"
	@touch $(STAMP)
	@echo "==> $(VENV) is ready"

test: setup
	$(PY) -m pytest -q tests

demo: setup
	bash scripts/demo.sh $(PY)

clean-demo:
	rm -rf runs/demo data/digits
