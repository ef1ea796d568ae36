# The two README commands: `make study` and `make test`.
# Both create .venv, install torch 2.13.0 first (the CPU wheel on a CPU machine), then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup study test bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

study: setup
	$(PY) jobs/tune.py --space search_spaces/quick.yaml

# Two test processes: the end-to-end tests wait on Ray's process start-up about a third of the
# time, so a second one fills those gaps (`make test TEST_WORKERS=0` runs them one by one).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal tests

clean-venv:
	rm -rf $(VENV)
