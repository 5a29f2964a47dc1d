# Two entry points for people: `make run` and `make test`. Both build .venv from scratch when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint unit bench install clean crds

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nodemem report
	$(VENV)/bin/nodemem apply -f examples/dev-shm-limit.yaml --dry-run

lint: $(STAMP)
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy --strict
	$(VENV)/bin/lint-imports

unit: $(STAMP)
	$(PY) -m pytest

test: lint unit

bench: $(STAMP)
	$(PY) bench/scan.py
	$(PY) bench/cleanup.py
	$(PY) bench/exec_latency.py
	$(PY) bench/controller_scale.py
	$(PY) bench/agent_load.py

# The CRDs are generated from the pydantic models; the chart carries the same files.
crds: $(STAMP)
	$(VENV)/bin/nodemem crds --output-dir crds
	$(VENV)/bin/nodemem crds --output-dir charts/nodemem/crds

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
