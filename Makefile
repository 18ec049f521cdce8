# One entry point. `make demo` and `make test` set up their own virtual
# environment on a fresh machine, with exactly the versions in requirements/dev.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# uv installs and locks; it lives in its own environment beside the project's, so
# syncing the project's environment to the lock never removes it.
UV_VERSION := 0.13.9
UV := $(VENV)/.uv/bin/uv
# The locks are universal (any OS, Python 3.11+), hash-checked, and written by `make lock`,
# which keeps every pin that still satisfies pyproject.toml; `make lock UPGRADE=1` moves
# every pin to the newest release inside pyproject.toml's ranges.
COMPILE = $(UV) pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	--quiet --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)

.PHONY: demo test test-fast proto proto-check lock bench loadtest chaos soak lint clean

$(UV):
	$(PYTHON) -m venv $(VENV)/.uv
	$(VENV)/.uv/bin/python -m pip install --quiet uv==$(UV_VERSION)

$(STAMP): requirements/dev.txt pyproject.toml | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --python $(PY) --require-hashes requirements/dev.txt
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# Rewrites the locks from pyproject.toml: dev.txt (what `make demo`, `make test` and CI
# install), image.txt and image-gpu.txt (deploy/Dockerfile; the GPU set swaps
# onnxruntime for onnxruntime-gpu, which installs into the same package folder).
lock: | $(UV)
	$(COMPILE) --extra dev -o requirements/dev.txt
	$(COMPILE) --extra ray --extra kubernetes --extra postgresql -o requirements/image.txt
	$(COMPILE) --extra gpu --extra ray --extra kubernetes --extra postgresql --no-emit-package onnxruntime \
	  -o requirements/image-gpu.txt

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

# Hours of stream on a local farm: frames, timestamps, lip sync and memory over time.
soak: $(STAMP)
	$(PY) loadtests/soak.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy scheduler workers avatarfarm farm

clean:
	rm -rf $(VENV) var
