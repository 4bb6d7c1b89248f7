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

.PHONY: setup test-deps demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e ".[$(EXTRAS)]"

demo: setup
	$(VENV)/bin/lightspan prepare --config $(DEMO_CONFIG)
	$(VENV)/bin/lightspan train --config $(DEMO_CONFIG)

# DeepSpeed ships only an sdist: build it against the venv's torch (no isolated build env pulling a CUDA torch),
# with no C++ ops (DS_BUILD_OPS=0). megatron-core reads/writes Megatron .bin/.idx corpora in the data tests.
# shellcheck lints launch/ (tests/test_launch_scripts.py): installed from the Debian packages when absent and this runs
# as root with apt-get; otherwise that one test skips.
test-deps: setup
	@$(PY) -c "import deepspeed, megatron.core" 2>/dev/null || DS_BUILD_OPS=0 $(PIP) install -q \
		--disable-pip-version-check --no-build-isolation "deepspeed==0.19.8" "megatron-core==0.16.1"
	@command -v shellcheck >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -qq shellcheck >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
		  apt-get install -y -qq shellcheck >/dev/null 2>&1; }; }; } || \
		echo "shellcheck not installed (needs root and apt-get): the launch/ lint test will skip"

test: test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs data .pytest_cache
