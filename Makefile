# Two commands a newcomer needs (README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
# CPU build that lies on this kind of machine's disk; GPU users: `make setup TORCH=torch` (or their own build).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test
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
