# chest-ct: two commands set everything up on a fresh machine.
#   make run    create .venv if missing, run the whole pipeline locally (kfp.local + MLflow on SQLite)
#   make test   create .venv if missing, run the lint and type checks (make lint), then the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION ?= 3.3.30
# Platform packages the tests read (KFP backend protos, KServe API types), downloaded, never installed.
PLATFORMS := .venv-platforms

# The public zip of the original tutorials; on a machine without internet use a local copy:
#   make run DATA=../shared/data/chest-ct
DATA ?= https://drive.google.com/file/d/1z0mreUtRmR-P-magILsDR3T7M6IkGXtY/view?usp=sharing
PARAMS ?=
MODEL_DIR ?= $(shell test -f runs/latest.json && $(PYTHON) -c 'import json;print(json.load(open("runs/latest.json"))["model_dir"])')
HTTP_PORT ?= 8080
GRPC_PORT ?= 8081
PYTEST_ARGS ?=
# What ruff and mypy check (their settings: pyproject.toml); ruff also reads tests/.
LINT_PATHS := chest_ct components pipelines serving bench

.PHONY: venv run serve lint format test compile bench upload submit schedule clean

# Runtime lock (what the training image installs) plus the test-only lock.
$(VENV)/.installed: requirements.lock requirements-test.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock -r requirements-test.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# One pip download per line: the file pins several versions of the same package on purpose.
$(PLATFORMS)/.downloaded: requirements-platforms.lock $(VENV)/.installed
	mkdir -p $(PLATFORMS)
	grep -v '^#' requirements-platforms.lock | grep . | while read -r pin; do \
		$(PY) -m pip download --quiet --no-deps --require-hashes --dest $(PLATFORMS) -r <(echo "$$pin") || exit 1; \
	done
	touch $@

# checkov pins packaging<24, which breaks pytest in the same env: it gets its own venv.
$(CHECKOV_VENV)/.installed:
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m pipelines.run_local --data "$(DATA)" $(PARAMS)

serve: $(VENV)/.installed
	@test -n "$(MODEL_DIR)" || { echo "no model: run 'make run' first or pass MODEL_DIR=<SavedModel dir>" >&2; exit 2; }
	$(PY) -m serving --model_dir "$(MODEL_DIR)" --http_port $(HTTP_PORT) --grpc_port $(GRPC_PORT)

# Any finding fails the run; `make format` applies ruff's formatting and safe fixes.
lint: $(VENV)/.installed
	$(PY) -m ruff check $(LINT_PATHS) tests
	$(PY) -m ruff format --check $(LINT_PATHS) tests
	$(PY) -m mypy $(LINT_PATHS)

format: $(VENV)/.installed
	$(PY) -m ruff format $(LINT_PATHS) tests
	$(PY) -m ruff check --fix $(LINT_PATHS) tests

test: lint $(VENV)/.installed $(CHECKOV_VENV)/.installed $(PLATFORMS)/.downloaded
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks on ../shared/data/chest-ct (each prints a table and a JSON line, and updates docs/benchmarks.md).
bench: $(VENV)/.installed
	$(PY) -m bench.train
	$(PY) -m bench.serve
	$(PY) -m bench.quality
	$(PY) -m bench.ingest

# Compile-time cluster settings: CHEST_CT_TRAIN_IMAGE, CHEST_CT_GPU_COUNT, CHEST_CT_GPU_NODE_SELECTOR, ... (pipelines/cluster.py)
compile: $(VENV)/.installed
	$(PY) -m pipelines.compile --output pipelines/chest_ct_pipeline.yaml

# Talk to a Kubeflow Pipelines server: KFP_HOST, KFP_NAMESPACE and KFP_TOKEN from the environment.
upload: $(VENV)/.installed
	$(PY) -m pipelines.submit upload
submit: $(VENV)/.installed
	$(PY) -m pipelines.submit run $(foreach p,$(PARAMS),--param $(p))
schedule: $(VENV)/.installed
	@test -n "$(CRON)" || { echo 'set CRON="0 0 3 * * *" (6 fields, seconds first)' >&2; exit 2; }
	$(PY) -m pipelines.submit schedule --cron "$(CRON)" $(foreach p,$(PARAMS),--param $(p))

clean:
	rm -rf runs mlartifacts mlflow.db .pytest_cache .mypy_cache .ruff_cache $(PLATFORMS)
