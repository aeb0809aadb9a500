"""The ``not_cleared`` gate end to end: HM (the emulator) decides clearances, its signed webhooks
reach the real daemon, and MQTT messages of VINs that are rejected or revoked land in rejected/.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from ingest.app import Daemon
from ingest.config import Settings
from ingest.emulator import Behaviour, Delays, EmulatorConfig, EmulatorServer, ManualClock
from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.daemon import APP_ID, daemon_config
from ingest.testing.traffic import v1_message
from tests.daemon_support import read_table

DECISION_S = 60.0
KEPT = "SBXGATE0000000010"  # approved and stays approved
REVOKED = "SBXGATE0000000020"  # approved, then revoked while streaming
REFUSED = "SBXGATE000000003R"  # the emulator rejects VINs ending in R


def _value(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def _until(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("sink", ["thread", "process"])
async def test_rows_of_rejected_and_revoked_vins_are_quarantined_as_not_cleared(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path, sink: str
) -> None:
    """With ``sink = "process"`` the refused VINs travel to the sink process with the records."""
    fleet_file = tmp_path / "fleet.csv"
    fleet_file.write_text(f"vin,brand\n{KEPT},sandbox\n{REVOKED},sandbox\n{REFUSED},sandbox\n")
    clock = ManualClock(start=float(int(time.time())))
    config = EmulatorConfig(
        behaviour=Behaviour(delays=Delays(DECISION_S, DECISION_S, DECISION_S)), tick_s=0.05
    )
    base = dt.datetime.now(dt.UTC).replace(microsecond=0)
    async with (
        EmulatorServer(tmp_path / "hm", config=config, clock=clock) as hm,
        httpx.AsyncClient() as admin,
    ):
        info = hm.info()
        tree = daemon_config(
            broker,
            certs,
            tmp_path,
            overrides={
                "api": {
                    "base_url": info["base_url"],
                    "client_id": info["client_id"],
                    "client_secret": info["client_secret"],
                },
                # A long interval: after the first cycle only webhooks drive the daemon's state.
                "fleet": {"enabled": True, "file": str(fleet_file), "interval_s": 3600.0},
                "webhook": {"secret": info["webhook_secret"]},
                "ingest": {"sink": sink},
            },
        )
        settings = Settings.model_validate(tree)
        daemon = Daemon(settings, registry=CollectorRegistry())
        run = asyncio.create_task(daemon.run())
        try:
            await asyncio.wait_for(daemon.started.wait(), 30)
            hook = f"http://127.0.0.1:{daemon.http_port}/webhook"
            await admin.put(f"{hm.admin_url}/webhook", json={"url": hook})
            await _until(
                lambda: _value(daemon, "hm_ingest_clearance_vehicles", {"status": "pending"}) == 3,
                "the first reconcile to request all three clearances",
            )
            await admin.post(f"{hm.admin_url}/advance", json={"seconds": DECISION_S})
            await _until(
                lambda: (
                    daemon.control is not None
                    and daemon.control.store.statuses()
                    == {KEPT: "approved", REVOKED: "approved", REFUSED: "rejected"}
                ),
                "the decisions to arrive by webhook",
            )

            messages = [
                v1_message(APP_ID, vin, f"before-{vin}", 0, base)
                for vin in (KEPT, REVOKED, REFUSED)
            ]
            await asyncio.to_thread(_publish, broker, certs, messages)
            await _until(lambda: _value(daemon, "hm_ingest_messages_acked_total") == 3, "3 acks")

            assert daemon.control is not None
            await daemon.control.client.delete_clearance(REVOKED)
            await admin.post(f"{hm.admin_url}/advance", json={"seconds": DECISION_S})
            await _until(
                lambda: (
                    daemon.control is not None
                    and daemon.control.store.statuses().get(REVOKED) == "revoked"
                ),
                "the revocation to arrive by webhook",
            )
            later = [v1_message(APP_ID, vin, f"after-{vin}", 1, base) for vin in (KEPT, REVOKED)]
            await asyncio.to_thread(_publish, broker, certs, later)
            await _until(lambda: _value(daemon, "hm_ingest_messages_acked_total") == 5, "5 acks")
            accepted = _value(daemon, "hm_ingest_webhook_deliveries_total", {"outcome": "accepted"})
        finally:
            daemon.shutdown.set()
            code = await asyncio.wait_for(run, 30)
    assert code == 0
    assert accepted >= 4  # three decisions and the revocation (revoking too, usually)

    telemetry = {r["message_id"] for r in read_table(settings.output.path, "telemetry")}
    assert telemetry == {f"before-{KEPT}", f"before-{REVOKED}", f"after-{KEPT}"}
    quarantined = {
        r["message_id"]: (r["reason"], r["vin"])
        for r in read_table(settings.output.path, "rejected")
    }
    assert quarantined == {
        f"before-{REFUSED}": ("not_cleared", REFUSED),
        f"after-{REVOKED}": ("not_cleared", REVOKED),
    }
    # Every transition the daemon saw is in the clearance table for analytics to join.
    history = read_table(settings.output.path, "clearance")
    seen = {(r["vin"], r["to_status"]) for r in history}
    assert {(KEPT, "approved"), (REFUSED, "rejected"), (REVOKED, "revoked")} <= seen


def _publish(broker: MosquittoBroker, certs: CertBundle, messages: list[Any]) -> None:
    with Publisher(broker, certs) as publisher:
        publisher.publish_many((m.topic, m.payload) for m in messages)
