# The two README commands: `make study` and `make test`.
# Both create .venv, install torch 2.13.0 first (the CPU wheel on a CPU machine), then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup study test bench gpu-check clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

study: setup
	$(PY) jobs/tune.py --space search_spaces/quick.yaml

# Two test processes, each module whole in one, the longest first (tests/conftest.py).
test: setup
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests

# On a CUDA machine with the project installed in $(VENV) (no setup here: such a machine may have
# no package index); without CUDA it says so and exits 2.
gpu-check:
	PY=$(PY) bash benchmarks/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
