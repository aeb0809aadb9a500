"""SIGKILL around the Iceberg append, then a restart: every row in the tables exactly once.

The committing process is a child (``python -m tests.iceberg.support``) killed by a fault point
(``ingest.testing.faultpoints``) at the second batch; this process then opens the pipeline again,
which replays the pending intent exactly as the daemon does at start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ingest.checkpoint import CheckpointStore
from ingest.config import Settings
from ingest.testing.faultpoints import CRASH_ENV
from ingest.testing.traffic import Message
from tests.iceberg.support import (
    commit_groups,
    keys,
    load,
    lsn_ranges,
    lsn_summaries,
    messages,
    plain_rows,
    settings_tree,
    untimed_message,
)

REPO = Path(__file__).resolve().parents[2]


def _crash_child(tmp_path: Path, tree: dict, groups: list[list[Message]], crash_at: str) -> None:
    settings_file = tmp_path / "settings.json"
    settings_file.write_bytes(orjson.dumps(tree))
    groups_file = tmp_path / "groups.json"
    groups_file.write_bytes(
        orjson.dumps(
            [
                [
                    {
                        "topic": m.topic,
                        "payload": m.payload.decode(),
                        "message_id": m.message_id,
                        "vin": m.vin,
                        "items": m.items,
                    }
                    for m in group
                ]
                for group in groups
            ]
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HM_INGEST_")}
    child = subprocess.run(
        [sys.executable, "-m", "tests.iceberg.support", str(settings_file), str(groups_file)],
        cwd=REPO,
        env=env | {CRASH_ENV: crash_at},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]


@pytest.mark.parametrize(
    ("point", "appended_before_crash"),
    [("sink.files_written", False), ("sink.dedupe_recorded", True)],
)
def test_a_crash_around_the_append_replays_without_a_second_append(
    tmp_path: Path, point: str, appended_before_crash: bool
) -> None:
    tree = settings_tree(tmp_path)
    settings = Settings.model_validate(tree)
    # Batch 2 mixes timed and untimed rows, so its telemetry file is copied per partition too.
    groups = [
        messages(20, prefix="a", invalid_fraction=0.2),
        [*messages(19, prefix="b", seed=2, invalid_fraction=0.2), untimed_message("u-1")],
    ]
    _crash_child(tmp_path, tree, groups, f"{point}:2")  # killed in the second batch

    pending = CheckpointStore(settings.state.path / "checkpoint.json").load().pending
    assert pending is not None
    assert (pending.first_lsn, pending.last_lsn) == (21, 40)
    telemetry = load(settings, "telemetry")
    assert lsn_summaries(telemetry) == ([20, 40] if appended_before_crash else [20])
    output = settings.output.path
    assert isinstance(output, Path)
    before = {p: p.stat().st_mtime_ns for p in (output / "telemetry").glob("*/*.parquet")}

    commit_groups(settings, [])  # start-up replay of the intent, nothing new

    assert CheckpointStore(settings.state.path / "checkpoint.json").load().committed_lsn == 40
    for name, key in (("telemetry", ("message_id", "item_index")), ("rejected", ("lsn",))):
        table = load(settings, name)
        ranges = lsn_ranges(output / name)
        assert lsn_summaries(table) == [last for _, last in ranges], name
        scanned = keys(table.scan().to_arrow(), key)
        assert len(scanned) == len(set(scanned)), f"{name}: rows appended twice"
        assert scanned == keys(plain_rows(output, name), key)
    assert load(settings, "telemetry").scan(row_filter="timestamp IS NULL").to_arrow().num_rows == 1
    after = {p: p.stat().st_mtime_ns for p in (output / "telemetry").glob("*/*.parquet")}
    if appended_before_crash:
        # The table already referenced the batch's files: the replay left them untouched.
        assert after == before
