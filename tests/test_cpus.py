"""Usable CPUs (``[ingest] sink = "auto"`` decides by them), against fake cgroup folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingest.config import Settings
from ingest.cpus import usable_cpus
from ingest.preflight import check_sink

AFFINITY = float(len(os.sched_getaffinity(0)))


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, AFFINITY),  # no cgroup files: the affinity mask
        ({"cpu.max": "max 100000\n"}, AFFINITY),  # v2, no limit
        ({"cpu.max": "50000 100000\n"}, min(AFFINITY, 0.5)),  # v2, cpu: 500m
        ({"cpu.max": "150000 100000\n"}, min(AFFINITY, 1.5)),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),
        (
            {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"},
            min(AFFINITY, 1.0),
        ),
        ({"cpu.max": "garbage\n"}, AFFINITY),  # unreadable: not a limit
    ],
)
def test_usable_cpus_follow_the_container_quota(
    tmp_path: Path, files: dict[str, str], expected: float
) -> None:
    assert usable_cpus(_cgroup(tmp_path, files)) == expected


def test_auto_picks_the_process_from_two_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.model_validate({"ingest": {"sink": "auto"}})
    monkeypatch.setattr("ingest.config.usable_cpus", lambda: 2.0)
    assert settings.ingest.sink_mode == "process"
    monkeypatch.setattr("ingest.config.usable_cpus", lambda: 1.5)
    assert settings.ingest.sink_mode == "thread"
    pinned = Settings.model_validate({"ingest": {"sink": "thread"}})
    monkeypatch.setattr("ingest.config.usable_cpus", lambda: 8.0)
    assert pinned.ingest.sink_mode == "thread"


def test_check_names_where_the_sink_runs_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ingest.preflight.usable_cpus", lambda: 1.5)
    monkeypatch.setattr("ingest.config.usable_cpus", lambda: 1.5)
    finding = check_sink(Settings.model_validate({}))
    assert str(finding).endswith("on a thread: auto, with 1.5 usable CPU(s) (a process from 2)")
    pinned = check_sink(Settings.model_validate({"ingest": {"sink": "process"}}))
    assert str(pinned).endswith("on a process (set explicitly)")
