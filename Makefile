# align — set-up, quickstart, tests and benchmarks.
# GPU users: make setup TORCH_SPEC="torch" (or a CUDA wheel index via PIP_EXTRA_INDEX_URL).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/align run recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=12 tests

bench: $(STAMP)
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache
