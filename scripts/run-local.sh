#!/usr/bin/env bash
# Quick start: run hm-ingest end to end on this machine (what `make run-local` runs).
#
# Starts a local mutual-TLS Mosquitto with throwaway certificates, runs the daemon against it,
# publishes test traffic and summarises the Parquet written under ./local-run/data.
#
#   scripts/run-local.sh [--duration SECONDS] [--messages N] [--out DIR]
#
# Creates .venv (and installs Mosquitto with apt-get when missing and run as root) on first use.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -d .venv ]; then
  echo "no .venv yet: running 'make install' first"
  make install
fi

exec .venv/bin/python -m ingest.localrun "$@"
