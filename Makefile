# Two commands a newcomer needs (README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
# CPU build that lies on this kind of machine's disk; GPU users: `make setup TORCH=torch` (or their own build).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test gpu-wheels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[all]"
	# img2dataset pulls the Python 2-era `dataclasses` backport, which shadows the standard library
	# inside Prefect's temporary API server (STACK.md): remove it again.
	$(BIN)/python -m pip uninstall -y -q dataclasses
	touch $@

# The whole pipeline as a Prefect flow (a temporary Prefect server starts and stops with it).
demo: setup
	HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
		$(BIN)/python -m flows.pipeline --config tiny

test: setup
	$(BIN)/ruff check thinkdiff tasks flows tests benchmarks
	$(BIN)/python -m pytest -q

# Wheels the GPU machine lacks (benchmarks/gpu_checks.sh installs them there from .whl/).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
		transformers==5.24.0 diffusers==0.42.1 importlib_metadata==10.2.0
