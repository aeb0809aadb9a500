"""Compaction passes running beside the real daemon while it writes into the same partition."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.app import Daemon
from ingest.compact import Compactor, Policy, TableReport
from ingest.config import Settings
from ingest.storage import OutputStore
from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.daemon import APP_ID, daemon_config, wait_for
from ingest.testing.traffic import stream
from tests.storage.daemon_support import assert_exactly_once, run_until, s3_settings, scrape
from tests.storage.s3_support import MotoS3

# Items stamped Oct 1: a closed partition that the running daemon keeps adding (late) files to.
LATE = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
async def test_compaction_beside_a_running_daemon_keeps_every_message_once(
    where: str,
    broker: MosquittoBroker,
    certs: CertBundle,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tree = daemon_config(broker, certs, tmp_path, overrides={"output": {"flush_age_s": 0.05}})
    if where == "s3":
        s3: MotoS3 = request.getfixturevalue("s3")
        uri = f"s3://{s3.new_bucket()}/hm"
        settings = s3_settings(tree, uri, monkeypatch)
        store = OutputStore.open(uri)
    else:
        settings = Settings.model_validate(tree)
        store = OutputStore.open(tmp_path / "data")
    messages = list(stream(APP_ID, 3000, seed=31, base=LATE))
    daemon = Daemon(settings, registry=CollectorRegistry())
    stop = threading.Event()
    passes: list[TableReport] = []

    def compact_repeatedly() -> None:
        while not stop.is_set():
            passes.append(Compactor(store, settings.state.path, Policy()).run()[0])

    def scenario() -> None:
        compaction = threading.Thread(target=compact_repeatedly, name="compaction")
        compaction.start()
        try:
            with Publisher(broker, certs, timeout_s=60) as publisher:
                for start in range(0, len(messages), 300):
                    burst = messages[start : start + 300]
                    publisher.publish_many((m.topic, m.payload) for m in burst)
                    sent = start + len(burst)
                    wait_for(
                        lambda n=sent: scrape(daemon, "hm_ingest_messages_acked_total") >= n,
                        30,
                        "the burst acknowledged",
                    )
            wait_for(lambda: any(p.runs for p in passes), 60, "a pass that merged something")
        finally:
            stop.set()
            compaction.join(60)

    assert await run_until(daemon, scenario, timeout_s=180) == 0
    merged_while_running = sum(p.runs for p in passes)
    [final, *_] = Compactor(store, settings.state.path, Policy()).run()

    assert_exactly_once(store, messages)
    assert merged_while_running > 0
    files = store.list_files(store.join("telemetry", "date=2026-10-01"))
    assert len(files) == 1, [f.name for f in files]
    assert final.files_after == 1
