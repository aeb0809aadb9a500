# hm-fleet-ingest: every target uses .venv/bin/ directly, so nothing needs activating.
#
#   make run-local   install, then run the daemon end to end on this machine (scripts/run-local.sh)
#   make check       install, then lint, types and tests: the project's test command (CI runs it)
#   make install     .venv with the package and its dev tools, plus Mosquitto for the tests
#   make lint | types | test | bench

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written after a successful `pip install -e '.[dev]'`; redone when pyproject.toml changes.
STAMP := $(VENV)/.installed
# The tests start their own Mosquitto (mosquitto) and bulk-publish with mosquitto_pub
# (mosquitto-clients). Debian puts mosquitto in /usr/sbin, which a non-root PATH often lacks.
MOSQUITTO_PACKAGES := mosquitto mosquitto-clients
PYTEST_ARGS ?=

.PHONY: help install mosquitto lint types test check run-local bench

help:
	@echo "make run-local  install everything and run the daemon end to end (local Mosquitto,"
	@echo "                generated certificates, test traffic): what the README quick start runs"
	@echo "make check      install, then lint + types + test (the project's test command)"
	@echo "make install    create $(VENV), pip install -e '.[dev]', install Mosquitto if missing"
	@echo "make lint       ruff check . && ruff format --check ."
	@echo "make types      mypy (strict, on the ingest package)"
	@echo "make test       python -m pytest -q"
	@echo "make bench      drain, decoder, write-ahead log and dedupe index benchmarks (prints figures)"

# Installs Mosquitto with apt-get when it is missing and we are root; otherwise says how to.
mosquitto:
	@if { command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1 \
	    && command -v mosquitto_pub >/dev/null 2>&1; then \
	  exit 0; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(MOSQUITTO_PACKAGES) with apt-get"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq; \
	  apt-get install -y -qq $(MOSQUITTO_PACKAGES) >/dev/null; \
	else \
	  echo "Mosquitto is missing; the tests and run-local need it. Install it with:"; \
	  echo "  sudo apt-get install -y $(MOSQUITTO_PACKAGES)   # Debian/Ubuntu"; \
	  echo "  brew install mosquitto                           # macOS"; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: mosquitto | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) | mosquitto
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The README's test command (CI runs exactly this). `make -k check` runs all three even when one
# fails.
check: lint types test

# What the README's quick start runs: scripts/run-local.sh starts a local Mosquitto with generated
# certificates, runs the daemon against it and publishes a stream of test traffic.
run-local: install
	@if [ ! -f scripts/run-local.sh ]; then \
	  echo "scripts/run-local.sh is missing from this checkout" >&2; exit 1; \
	fi
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/run-local.sh

bench: $(STAMP) | mosquitto
	$(BIN)/python bench/drain_bench.py
	$(BIN)/python -m bench.decode_bench
	$(BIN)/python bench/wal_bench.py
	$(BIN)/python bench/dedupe_bench.py
