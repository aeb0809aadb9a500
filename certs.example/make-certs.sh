#!/usr/bin/env bash
# Throwaway CA, broker and client certificates for LOCAL RUNS ONLY: never real keys, never deployed.
#
#   certs.example/make-certs.sh [OUT_DIR] [options of python -m ingest.testing.certs]
#
# Uses the project's .venv when it exists (make install creates it), else python3 with the package
# installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/local}"
[ "$#" -gt 0 ] && shift
python="$here/../.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3 || true)"
if [ -z "$python" ] || ! "$python" -c "import ingest.testing.certs" 2>/dev/null; then
  echo "make-certs.sh: the hm-fleet-ingest package is not installed; run 'make install' first" >&2
  exit 2
fi
exec "$python" -m ingest.testing.certs "$out" "$@"
