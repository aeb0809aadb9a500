"""``python -m ingest.localrun``: the quick-start runner, end to end as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ingest.testing.daemon import APP_ID
from ingest.testing.traffic import stream

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MESSAGES = 500


def test_local_run_ingests_the_stream_and_quarantines_the_invalid(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m", "ingest.localrun",
        "--messages", str(MESSAGES),
        "--duration", "30",
        "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # The same arguments the runner uses: invalid messages are the ones with no rows.
    messages = list(stream(APP_ID, MESSAGES, invalid_fraction=0.01))
    valid = {m.message_id for m in messages if m.items > 0}
    invalid = sum(1 for m in messages if m.items == 0)
    assert invalid > 0, "the stream should contain invalid messages to quarantine"

    files = sorted((out / "data" / "telemetry").glob("*/*.parquet"))
    assert files, result.stdout
    ids: set[str] = set()
    rows = 0
    for path in files:
        table = pq.read_table(path, columns=["message_id"])
        rows += table.num_rows
        ids.update(table.column("message_id").to_pylist())
    assert ids == valid
    assert rows == sum(m.items for m in messages)

    printed = re.search(r"^\s*quarantined\s+(\d+) messages$", result.stdout, re.MULTILINE)
    assert printed is not None, result.stdout
    assert int(printed.group(1)) == invalid
    assert f"published    {MESSAGES} messages" in result.stdout
    assert "duckdb -c" in result.stdout
