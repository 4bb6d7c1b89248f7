# The two commands of the README: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Installed only when the venv has no torch yet; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,eval
DEMO_CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e ".[$(EXTRAS)]"

demo: setup
	$(VENV)/bin/lightspan prepare --config $(DEMO_CONFIG)
	$(VENV)/bin/lightspan train --config $(DEMO_CONFIG)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs data .pytest_cache
