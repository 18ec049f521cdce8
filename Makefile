# One entry point. `make demo` and `make test` set up their own virtual
# environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast proto proto-check bench loadtest chaos lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/avatarfarm demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Regenerates avatarfarm/v1 from proto/ (the only place generated code lives).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/avatarfarm/v1/*.proto

proto-check: proto
	git diff --exit-code -- avatarfarm/v1

bench: $(STAMP)
	$(PY) loadtests/worker_bench.py

# The scheduler at scale: 1,000 simulated workers, 10,000 rooms (several minutes).
loadtest: $(STAMP)
	$(PY) loadtests/scheduler_load.py

# Failover under load: workers killed at intervals, the scheduler once (about 2 minutes).
chaos: $(STAMP)
	$(PY) loadtests/chaos.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy scheduler workers avatarfarm

clean:
	rm -rf $(VENV) var
