# Hypha: every target creates .venv and installs pinned dependencies when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test demo lint bench clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install everything

test: $(STAMP) ## run the whole test suite
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP) ## run a local Hypha network training a model with DiLoCo
	$(BIN)/hypha up

lint: $(STAMP) ## ruff and mypy --strict
	@mkdir -p .mypy-path && ln -sfn "$$($(BIN)/python -c 'import os, trio; print(os.path.dirname(trio.__file__))')" .mypy-path/trio
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

bench: $(STAMP) ## every benchmark; results in bench/results/
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
