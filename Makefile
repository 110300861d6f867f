# Two commands a newcomer needs (README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV ?= .venv
# CPU build that lies on this kind of machine's disk; GPU users: `make setup TORCH=torch` (or their own build).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The exact versions `make test` last passed with (everything but torch, which TORCH sets): a fresh
# checkout installs what was tested, not whatever the registry published since. `make constraints`
# moves them to the newest releases pyproject.toml allows; run `make test` before committing that.
CONSTRAINTS := conf/constraints.txt

.PHONY: setup demo test gpu-wheels constraints
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[all]"
	# img2dataset pulls the Python 2-era `dataclasses` backport, which shadows the standard library
	# inside Prefect's temporary API server (its flows then time out starting): remove it again.
	$(BIN)/python -m pip uninstall -y -q dataclasses
	touch $@

# The whole pipeline as a Prefect flow (a temporary Prefect server starts and stops with it).
demo: setup
	HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
		$(BIN)/python -m flows.pipeline --config tiny

test: setup
	$(BIN)/ruff check thinkdiff tasks flows tests benchmarks
	$(BIN)/python -m pytest -q

constraints: setup
	# eager: every dependency to its newest allowed release; "$(TORCH)" keeps torch where it is.
	$(BIN)/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH)" -e ".[all]"
	$(BIN)/python -m pip uninstall -y -q dataclasses
	{ echo "# pip constraints: the versions 'make test' passed with; regenerate with 'make constraints'"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

# Wheels the GPU machine lacks (benchmarks/gpu_checks.sh installs them there from .whl/).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
		transformers==5.24.0 diffusers==0.42.1 importlib_metadata==10.2.0
