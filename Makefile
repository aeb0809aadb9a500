# hm-fleet-ingest: every target uses .venv/bin/ directly, so nothing needs activating.
#
#   make demo        install, then run the whole system on this machine (hm-ingest demo)
#   make check       install, then lint, types and tests: the project's test command (CI runs it)
#   make install     .venv with the package and its dev tools, plus Mosquitto for the tests
#   make lint | types | test | bench | faults

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

.PHONY: help install mosquitto lint types test check demo bench faults

help:
	@echo "make demo       install everything and run the whole system for a minute: local Mosquitto"
	@echo "                (mutual TLS), HM emulator (REST + vehicle stream), the daemon; DEMO_ARGS=..."
	@echo "make check      install, then lint + types + test (the project's test command)"
	@echo "make install    create $(VENV), pip install -e '.[dev]', install Mosquitto if missing"
	@echo "make lint       ruff check . && ruff format --check ."
	@echo "make types      mypy (strict, on the ingest package)"
	@echo "make test       python -m pytest -q"
	@echo "make bench      drain, decoder, write-ahead log and dedupe index benchmarks (prints figures)"
	@echo "make faults     the full fault-injection report (20 kill points; prints the table)"

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
	  echo "Mosquitto is missing; the tests and the demo need it. Install it with:"; \
	  echo "  sudo apt-get install -y $(MOSQUITTO_PACKAGES)   # Debian/Ubuntu"; \
	  echo "  brew install mosquitto                           # macOS"; \
	fi

# Debian's and Ubuntu's python3 cannot create virtual environments without python3-venv.
$(BIN)/python:
	@$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing python3-venv with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	  else \
	    echo "$(PYTHON) cannot create a virtual environment; install python3-venv:" >&2; \
	    echo "  sudo apt-get install -y python3-venv" >&2; \
	    exit 1; \
	  fi; }
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

# What the README's quick start runs: hm-ingest demo starts a local Mosquitto with generated
# certificates, the HM emulator and the daemon, and prints what it wrote.
DEMO_ARGS ?=
demo: install
	$(BIN)/hm-ingest demo $(DEMO_ARGS)

bench: $(STAMP) | mosquitto
	$(BIN)/python bench/drain_bench.py
	$(BIN)/python -m bench.decode_bench
	$(BIN)/python bench/wal_bench.py
	$(BIN)/python bench/dedupe_bench.py

faults: $(STAMP) | mosquitto
	$(BIN)/python -m tests.faults.report --full
