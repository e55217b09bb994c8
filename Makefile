# One-command setup and test harness.
#
#   make test                     create the virtual environments, check Java, run pytest
#   make test PYTEST_ARGS='-k x'  pass arguments through to pytest
#   make setup                    only create or update the virtual environments
#   make endpoint-start / -stop   run a local AWS endpoint (MiniStack) for manual use
#
# Tests start and stop MiniStack themselves (tests/conftest.py), so nothing
# here has to clean up after a failing or interrupted test run.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3.11
PYTEST_ARGS ?=
BENCH_ARGS ?=

VENV := .venv
MINISTACK_VENV := .venv-ministack

# MiniStack 1.5.33 pins botocore 1.43.106 and runs Lambda code with the
# interpreter of its own virtual environment, so boto3 must be installed there.
MINISTACK_VERSION := 1.5.33
MINISTACK_BOTO3_VERSION := 1.43.106

# Each stamp name carries a hash of the file contents it was installed from,
# so an edited requirements file reinstalls and an unchanged one (even with a
# new modification time after a checkout) costs nothing.
DEV_REQUIREMENTS_HASH := $(shell sha256sum requirements/dev.txt | cut -c1-16)
PROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
VENV_READY := $(VENV)/.venv-created
MINISTACK_VENV_READY := $(MINISTACK_VENV)/.venv-created
DEV_STAMP := $(VENV)/.installed-dev-$(DEV_REQUIREMENTS_HASH)
PROJECT_STAMP := $(VENV)/.installed-project-$(PROJECT_HASH)
MINISTACK_STAMP := $(MINISTACK_VENV)/.installed-ministack-$(MINISTACK_VERSION)-boto3-$(MINISTACK_BOTO3_VERSION)

# Glue 5.0 image for the tests that need Glue's JVM classes (GlueContext).
GLUE_IMAGE_TAG ?= taxi-pipeline-glue-test
GLUE_DOCKERFILE ?= Dockerfile

.PHONY: setup test lint check-java endpoint-start endpoint-stop clean distclean \
	demo bench package test-glue

setup: $(PROJECT_STAMP) $(MINISTACK_STAMP)

# A venv counts as created only once `python -m venv` has finished, so one
# left half-made by an interrupted run is removed and made again.
$(VENV_READY):
	@command -v $(PYTHON) >/dev/null || { \
		echo "$(PYTHON) not found on PATH: install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; \
		exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	touch $@

$(MINISTACK_VENV_READY):
	@command -v $(PYTHON) >/dev/null || { \
		echo "$(PYTHON) not found on PATH: install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; \
		exit 1; }
	rm -rf $(MINISTACK_VENV)
	$(PYTHON) -m venv $(MINISTACK_VENV)
	touch $@

$(DEV_STAMP): | $(VENV_READY)
	rm -f $(VENV)/.installed-dev-* $(VENV)/.installed-project-*
	$(VENV)/bin/python -m pip install --quiet -r requirements/dev.txt
	touch $@

$(PROJECT_STAMP): $(DEV_STAMP)
	rm -f $(VENV)/.installed-project-*
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

$(MINISTACK_STAMP): | $(MINISTACK_VENV_READY)
	rm -f $(MINISTACK_VENV)/.installed-ministack-*
	$(MINISTACK_VENV)/bin/python -m pip install --quiet \
		ministack==$(MINISTACK_VERSION) boto3==$(MINISTACK_BOTO3_VERSION)
	touch $@

# PySpark 3.5 (the Spark version of Glue 5.0) starts a JVM, and Glue 5.0 runs on Java 17.
check-java:
	@java_bin="$${JAVA_HOME:+$$JAVA_HOME/bin/}java"; \
	version="$$("$$java_bin" -version 2>&1 | head -n 1 || true)"; \
	if [[ "$$version" != *'version "17'* ]]; then \
		echo "Java 17 is required for the Spark tests, but '$$java_bin -version' printed: $${version:-nothing}" >&2; \
		echo "Install it with: apt-get install openjdk-17-jre-headless (Debian/Ubuntu), or set JAVA_HOME to a Java 17." >&2; \
		exit 1; \
	fi

# pytest replaces the shell, so a signal from make (SIGTERM, or SIGINT on
# Ctrl-C) reaches it and its fixtures stop the local endpoint. With
# TAXI_NO_TESTS_IS_SUCCESS set, tests/conftest.py turns pytest's exit code 5
# (no tests collected) into 0, and leaves every other exit code as it is.
test: setup check-java
	TAXI_NO_TESTS_IS_SUCCESS=1 exec $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

endpoint-start: setup
	$(VENV)/bin/python -m taxi_pipeline.tooling.local_endpoint start

endpoint-stop: setup
	$(VENV)/bin/python -m taxi_pipeline.tooling.local_endpoint stop

demo: setup check-java
	$(VENV)/bin/taxi-pipeline demo

bench: setup check-java
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

package: setup
	$(VENV)/bin/taxi-pipeline package

test-glue: setup
	@command -v docker >/dev/null || { \
		echo "docker not found on PATH: make test-glue runs the glue tests in the Glue 5.0 image" >&2; \
		exit 1; }
	@docker info >/dev/null 2>&1 || { \
		echo "no Docker engine answers ('docker info' failed): make test-glue needs a Docker host" >&2; \
		exit 1; }
	docker build --tag $(GLUE_IMAGE_TAG) --file $(GLUE_DOCKERFILE) .
	docker run --rm $(GLUE_IMAGE_TAG)

# Stops a recorded endpoint first, because removing .run/ would lose its pid.
clean:
	@if [[ -f .run/endpoint.json && -x $(VENV)/bin/python ]]; then \
		$(VENV)/bin/python -m taxi_pipeline.tooling.local_endpoint stop; \
	fi
	rm -rf build .run .pytest_cache .ruff_cache .hypothesis spark-warehouse metastore_db derby.log
	find . -path ./$(VENV) -prune -o -path ./$(MINISTACK_VENV) -prune -o \
		-name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(MINISTACK_VENV) lib/*.egg-info
