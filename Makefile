# Two commands on a fresh machine: `make pipeline` and `make test`. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DS_ACCELERATOR ?= cpu
# `medrega` and the tests set the project's environment themselves (medrega/environment.py:
# offline, no telemetry); `make ui` starts Prefect's and MLflow's servers directly, so they are
# told here. MLflow's server job runner serves its GenAI features (judges, trace roll-ups), none
# of which the pipeline uses; left on, `make ui` starts seven more processes for it.
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

.PHONY: install pipeline test test-fast ui lock clean

# pip puts torch in first: only pip looks where the CPU wheel lies on disk (its find-links), and
# with torch==2.13.0 already there, uv keeps it. uv installs the rest in about half pip's time on
# a fresh machine (84 s with no cache, byte-compiling on both cores). Compiled at install, as pip
# does: where PYTHONDONTWRITEBYTECODE is set (these machines set it), nothing is compiled later,
# and every process would compile transformers, MLflow and Prefect from source again. --system-certs:
# the system certificate store, as pip uses it here (PIP_CERT), instead of uv's bundled roots.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt uv torch
	$(BIN)/uv pip install -q --system-certs --compile-bytecode --python $(BIN)/python -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the embedded default (profile tiny). A second run skips every stage.
pipeline: $(STAMP)
	$(BIN)/medrega pipeline

# The whole test suite, slow end-to-end tests included.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the end-to-end runs, for quick iteration.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Both UIs on loopback, over the same stores `make pipeline` writes (.prefect/, mlflow/).
# Ctrl-C stops both (the trap signals exactly the two servers started here and waits for them,
# so `make ui` returns only once they are gone).
# One MLflow worker: a UI for the person at this machine (MLflow's default is four processes).
# Ports and the MLflow store can be overridden: make ui PREFECT_UI_PORT=4300 MLFLOW_DB=/path/mlflow.db
UI_HOST ?= 127.0.0.1
PREFECT_UI_PORT ?= 4200
MLFLOW_UI_PORT ?= 5000
MLFLOW_DB ?= $(CURDIR)/mlflow/mlflow.db
ui: $(STAMP)
	@mkdir -p $(dir $(MLFLOW_DB))
	@$(BIN)/prefect server start --host $(UI_HOST) --port $(PREFECT_UI_PORT) & P=$$!; \
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(MLFLOW_DB) --host $(UI_HOST) --port $(MLFLOW_UI_PORT) --workers 1 & M=$$!; \
	trap 'kill $$P $$M 2>/dev/null; wait $$P $$M 2>/dev/null' INT TERM EXIT; \
	echo "Prefect UI: http://$(UI_HOST):$(PREFECT_UI_PORT)   MLflow UI: http://$(UI_HOST):$(MLFLOW_UI_PORT)   (Ctrl-C stops both)"; \
	wait

# Re-pin after changing dependencies in pyproject.toml.
lock: $(STAMP)
	{ echo "# Pinned versions that install together (pip install -c constraints.txt). Regenerate with make lock."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch==' ; echo "torch==2.13.0"; } > constraints.txt

clean:
	rm -rf artifacts .prefect
