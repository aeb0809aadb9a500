"""Compaction refuses to run while Iceberg tables reference the plain layout's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.checkpoint import CheckpointStore
from ingest.compact import CompactionError, Policy, compact
from ingest.config import load_settings


def test_compaction_refuses_when_iceberg_tables_reference_the_files(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    checkpoints = CheckpointStore(state / "checkpoint.json")
    checkpoints.begin(1, 1)
    checkpoints.commit(1)
    settings = load_settings(
        None,
        {
            "HM_INGEST_STATE_PATH": str(state),
            "HM_INGEST_OUTPUT_PATH": str(tmp_path / "data"),
            "HM_INGEST_ICEBERG_ENABLED": "true",
        },
    )
    with pytest.raises(CompactionError, match=r"\[iceberg\] enabled = true.*rewrite_data_files"):
        compact(settings, Policy())
