"""Issue 6 fault scenarios, CI-sized: the real daemon process against a real mutual-TLS Mosquitto.

Each test runs one scenario from :mod:`tests.faults.scenarios` and fails unless every published
message is in ``telemetry/`` or ``rejected/`` exactly once (lost = duplicated = 0). The full-size
run with the figures table is ``python -m tests.faults.report --full``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.accounting import rejected_copies, tally
from ingest.testing.daemon import wait_for
from tests.faults import scenarios
from tests.faults.harness import FaultDaemon, Outcome, fault_config
from tests.faults.hostile import hostile_message
from tests.faults.sizes import CI

pytestmark = pytest.mark.slow


def _check(outcome: Outcome) -> None:
    t = outcome.tally
    print(f"\n{outcome.scenario}: {t.describe()}; recovery {outcome.recovery_s:.2f} s")
    print(outcome.notes)
    assert outcome.tally.published > 0 or outcome.scenario.startswith("8.")
    assert outcome.ok, outcome.tally.describe()


def test_sigkill_at_random_moments_and_named_points(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    outcome = scenarios.sigkill(broker, certs, tmp_path, kills=CI.kills)
    _check(outcome)
    assert "not reached" not in outcome.notes, outcome.notes


def test_sigkill_with_the_sink_in_its_own_process(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    """The same kills with ``[ingest] sink = "process"``: the daemon or its sink process dies."""
    outcome = scenarios.sigkill(broker, certs, tmp_path, kills=CI.kills, seed=2, sink="process")
    _check(outcome)
    assert "not reached" not in outcome.notes, outcome.notes


def test_broker_sigkill_and_restart(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    _check(scenarios.broker_kill(broker, certs, tmp_path, kills=CI.broker_kills))


def test_network_fin_rst_and_freeze_longer_than_keepalive(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    _check(scenarios.network(broker, certs, tmp_path, rounds=CI.network_rounds))


def _tmpfs_available(tmp_path: Path) -> bool:
    return os.geteuid() == 0 and scenarios.can_mount_tmpfs(tmp_path / "probe")


@pytest.mark.parametrize(
    ("where", "tmpfs"),
    [("output", True), ("output+log", True), ("output", False)],
    ids=["tmpfs-output", "tmpfs-output-and-log", "injected-enospc-output"],
)
def test_disk_full_stops_acks_and_recovers(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path, where: str, tmpfs: bool
) -> None:
    if tmpfs and not _tmpfs_available(tmp_path):
        pytest.skip("mounting a tmpfs needs root (the injected-ENOSPC variant still runs)")
    outcome = scenarios.disk_full(
        broker,
        certs,
        tmp_path,
        messages=CI.disk_messages,
        log_on_full_disk=where == "output+log",
        use_tmpfs=tmpfs,
    )
    _check(outcome)


def test_torn_log_tail_and_leftover_temporary_files(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    _check(scenarios.torn_tail(broker, certs, tmp_path, messages=CI.torn_messages))


def test_hostile_payload_corpus(broker: MosquittoBroker, certs: CertBundle, tmp_path: Path) -> None:
    outcome = scenarios.hostile(broker, certs, tmp_path, count=CI.hostile_count, big=CI.hostile_big)
    _check(outcome)
    assert "decoder_error" not in outcome.notes, outcome.notes
    assert outcome.peak_rss_mb is not None
    assert outcome.peak_rss_mb < scenarios.RSS_LIMIT_MB


def test_hostile_payloads_from_hypothesis(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    """Hypothesis draws batches of broken payloads; the running daemon must quarantine each one
    with a reason, and stay up. Shrinking points at the smallest payload that escapes."""
    tree = fault_config(broker, certs, tmp_path)
    daemon = FaultDaemon(tree, tmp_path)
    output = tmp_path / "data"
    daemon.start()
    daemon.wait_ready()
    counter = iter(range(10**9))

    @settings(
        max_examples=8,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.data())
    def check(data: st.DataObject) -> None:
        batch = [
            data.draw(hostile_message(f"hyp-{next(counter):07d}"))
            for _ in range(data.draw(st.integers(1, 40)))
        ]
        ids = [m.message_id for m in batch]
        with Publisher(broker, certs) as publisher:
            publisher.publish_many((m.topic, m.payload) for m in batch)
        deadline = time.monotonic() + 30
        while tally(output, ids).lost and time.monotonic() < deadline:
            assert daemon.alive, daemon.log_text()[-3000:]
            time.sleep(0.2)
        result = tally(output, ids)
        assert result.ok, result.describe()
        _, rows = rejected_copies(output)
        reasons = {row["message_id"]: row["reason"] for row in rows}
        for message in batch:
            assert reasons.get(message.message_id), f"not quarantined: {message.payload[:300]!r}"

    try:
        check()
        wait_for(lambda: daemon.alive, 1, "the daemon to be up")
        assert daemon.stop_cleanly() == 0
    finally:
        daemon.kill()


def test_refused_client_certificates(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    outcome = scenarios.refused_certificates(broker, certs, tmp_path)
    print(outcome.notes)


def test_hm_api_faults_leave_ingestion_untouched(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    _check(scenarios.api_faults(broker, certs, tmp_path))


def test_forged_oversized_and_replayed_webhooks_are_refused(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    outcome = scenarios.webhook_attacks(broker, certs, tmp_path)
    print(outcome.notes)
