#!/usr/bin/env bash
# Throwaway CA, broker and client certificates for LOCAL RUNS ONLY: never real keys, never deployed.
set -euo pipefail
out="${1:-$(dirname "$0")/local}"
exec python -m ingest.testing.certs "$out" "${@:2}"
