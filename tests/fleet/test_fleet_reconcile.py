"""The control loop against the HM emulator over real HTTP: lifecycle, prune, refusals, scale,
outages. The emulator's clock only moves when a test advances it, so nothing here sleeps."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pytest

from ingest.fleet import ClearanceStateStore, Reconciler, ReconcileReport, TransitionHistory
from ingest.fleet.store import NOT_CLEARED
from ingest.hmapi import HmApiClient
from ingest.metrics import Metrics

from .conftest import STEP_S, Emulator, api_calls, vin


def write_fleet(path: Path, vins: Iterable[str], brand: str = "sandbox") -> Path:
    path.write_text("vin,brand,fleet\n" + "".join(f"{v},{brand},north\n" for v in vins))
    return path


def write_bad_fleet(path: Path) -> Path:
    path.write_text("vin,brand\nNOT-A-VIN,bmw\n")
    return path


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    return tmp_path / "fleet.csv"


def reconciler(
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory | None,
    fleet_file: Path | None,
    *,
    prune: bool = False,
    metrics: Metrics | None = None,
    **options: object,
) -> Reconciler:
    options.setdefault("min_cycle_gap_s", 0.0)
    return Reconciler(
        client, store, history, desired_file=fleet_file, prune=prune, metrics=metrics,
        **options,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_lifecycle_pending_approved_and_rejected_not_requested_again(
    emulator: Emulator,
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
    metrics: Metrics,
    fleet_file: Path,
    tmp_path: Path,
) -> None:
    wanted = [vin(1), vin(2), vin(3, "R")]  # the emulator rejects VINs ending in R
    loop = reconciler(client, store, history, write_fleet(fleet_file, wanted), metrics=metrics)

    first = await loop.reconcile_once()
    assert not first.failed
    assert sorted(r.vin for r in first.created) == sorted(wanted)
    assert store.statuses() == dict.fromkeys(wanted, "pending")
    assert {t.source for t in first.transitions} == {"request"}

    await emulator.advance(STEP_S)
    second = await loop.reconcile_once()
    assert second.created == []
    assert store.statuses() == {vin(1): "approved", vin(2): "approved", vin(3, "R"): "rejected"}
    [rejected] = [t for t in second.transitions if t.to_status == "rejected"]
    assert rejected.reason == "vehicle_not_supported"
    assert store.refusal(vin(3, "R")) == NOT_CLEARED
    assert store.refusal(vin(1)) is None

    creates_before = api_calls(metrics, "fleet_vehicles_create")
    third = await loop.reconcile_once()
    assert api_calls(metrics, "fleet_vehicles_create") == creates_before == 1
    assert [(r.vin, r.reason) for r in third.rejected] == [(vin(3, "R"), "vehicle_not_supported")]
    assert third.transitions == []
    assert (
        metrics.registry.get_sample_value("hm_ingest_clearance_vehicles", {"status": "approved"})
        == 2
    )
    assert (
        metrics.registry.get_sample_value("hm_ingest_clearance_vehicles", {"status": "rejected"})
        == 1
    )
    assert metrics.registry.get_sample_value("hm_ingest_last_reconcile_timestamp_seconds")
    # build_api_client's hook: one token for all of it, latencies observed per endpoint.
    assert metrics.registry.get_sample_value("hm_ingest_token_renewals_total") == 1
    assert (
        metrics.registry.get_sample_value(
            "hm_ingest_api_request_duration_seconds_count", {"endpoint": "fleet_vehicles_list"}
        )
        == 3
    )
    # Every transition went to Parquet: 3 → pending, 2 → approved, 1 → rejected.
    assert sum(1 for _ in (tmp_path / "out" / "clearance").rglob("*.parquet")) >= 1
    assert store.unexported() == 0


async def test_prune_revokes_approved_and_cancels_pending(
    emulator: Emulator,
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
    fleet_file: Path,
) -> None:
    write_fleet(fleet_file, [vin(1), vin(2)])
    await reconciler(client, store, history, fleet_file).reconcile_once()
    await emulator.advance(STEP_S)  # both approved
    write_fleet(fleet_file, [vin(1), vin(2), vin(3)])
    await reconciler(client, store, history, fleet_file).reconcile_once()  # vin 3 pending

    write_fleet(fleet_file, [vin(1)])
    keep = await reconciler(client, store, history, fleet_file, prune=False).reconcile_once()
    assert keep.removed == []
    assert keep.plan is not None
    assert keep.plan.remove == []

    pruning = reconciler(client, store, history, fleet_file, prune=True)
    report = await pruning.reconcile_once()
    assert sorted((r.vin, r.status) for r in report.removed) == [
        (vin(2), "revoking"),
        (vin(3), "canceling"),
    ]
    assert store.statuses()[vin(2)] == "revoking"
    assert store.refusal(vin(2)) is None  # still revoking: data may still be legitimate
    await emulator.advance(STEP_S)
    await pruning.reconcile_once()
    assert store.statuses() == {vin(1): "approved", vin(2): "revoked", vin(3): "canceled"}
    assert store.refusal(vin(2)) == store.refusal(vin(3)) == NOT_CLEARED

    # Desired again: revoked and canceled VINs are requested anew.
    write_fleet(fleet_file, [vin(1), vin(2), vin(3)])
    back = await pruning.reconcile_once()
    assert sorted(r.vin for r in back.created) == [vin(2), vin(3)]
    assert store.refusal(vin(2)) is None
    assert [t.to_status for t in store.transitions(vin(2))] == [
        "pending", "approved", "revoking", "revoked", "pending",
    ]  # fmt: skip


async def test_refused_delete_is_reported_once_not_retried_every_cycle(
    emulator: Emulator,
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
    metrics: Metrics,
    fleet_file: Path,
) -> None:
    # bmw cannot be canceled while pending: HM answers 422.
    write_fleet(fleet_file, [vin(1)], brand="bmw")
    await reconciler(client, store, history, fleet_file).reconcile_once()
    write_fleet(fleet_file, [vin(2)], brand="bmw")
    loop = reconciler(client, store, history, fleet_file, prune=True)
    report = await loop.reconcile_once()
    assert not report.failed
    [refusal] = report.refused
    assert (refusal.vin, refusal.action, refusal.http_status) == (vin(1), "remove", 422)
    assert refusal.detail == "cancellation is not supported for this vin"
    assert api_calls(metrics, "fleet_vehicle_delete", 422) == 1

    again = await loop.reconcile_once()
    assert again.refused == []
    assert again.held == [vin(1)]
    assert api_calls(metrics, "fleet_vehicle_delete", 422) == 1  # held, not asked again

    # Once its status changes (approved), removing it is attempted again, and works.
    await emulator.advance(STEP_S)
    removed = await loop.reconcile_once()
    assert [(r.vin, r.status) for r in removed.removed] == [(vin(1), "revoking")]


async def test_registration_hm_refuses_is_not_resent_until_the_file_changes(
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
    metrics: Metrics,
    fleet_file: Path,
) -> None:
    # nissan passes the local brand list, but HM's clearance enum (the emulator) refuses it.
    loop = reconciler(client, store, history, write_fleet(fleet_file, [vin(1)], brand="nissan"))
    first = await loop.reconcile_once()
    assert [(r.vin, r.action, r.detail) for r in first.refused] == [
        (vin(1), "create", "The brand is invalid")
    ]
    second = await loop.reconcile_once()
    assert (second.refused, second.held) == ([], [vin(1)])
    assert api_calls(metrics, "fleet_vehicles_create") == 1

    write_fleet(fleet_file, [vin(1)], brand="sandbox")  # the operator fixes the line
    third = await loop.reconcile_once()
    assert [r.vin for r in third.created] == [vin(1)]


async def test_thousand_vehicle_sync_converges_in_chunks(
    emulator: Emulator,
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
    metrics: Metrics,
    fleet_file: Path,
) -> None:
    wanted = [vin(n) for n in range(1000)]
    loop = reconciler(client, store, history, write_fleet(fleet_file, wanted), metrics=metrics)
    progress: list[tuple[str, int, int]] = []

    first = await loop.reconcile_once(progress=lambda *step: progress.append(step))
    assert len(first.created) == 1000
    assert api_calls(metrics, "fleet_vehicles_create") == 10  # 100 VINs per POST
    assert progress[-1] == ("create", 1000, 1000)
    assert len(progress) == 10

    await emulator.advance(STEP_S)
    second = await loop.reconcile_once()
    assert store.counts() == {"approved": 1000}
    assert len(second.transitions) == 1000

    third = await loop.reconcile_once()
    assert (third.created, third.transitions) == ([], [])
    assert api_calls(metrics, "fleet_vehicles_create") == 10
    assert api_calls(metrics, "fleet_vehicles_list") == 3
    assert store.unexported() == 0


async def test_bad_desired_file_keeps_last_good_fleet(
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
    fleet_file: Path,
) -> None:
    loop = reconciler(client, store, history, write_fleet(fleet_file, [vin(1)]), prune=True)
    await loop.reconcile_once()
    write_bad_fleet(fleet_file)
    report = await loop.reconcile_once()
    assert not report.failed
    assert report.removed == []  # the last good fleet still wants vin 1: nothing pruned
    assert report.desired == 1
    assert any("NOT-A-VIN" in w and "keeping the last good fleet" in w for w in report.warnings)


async def test_bad_desired_file_at_start_observes_only(
    emulator: Emulator,
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
    fleet_file: Path,
) -> None:
    write_bad_fleet(fleet_file)
    report = await reconciler(client, store, history, fleet_file, prune=True).reconcile_once()
    assert report.desired is None
    assert report.created == report.removed == []
    assert await emulator.statuses() == {}


async def test_outage_backs_off_reports_and_recovers(
    emulator: Emulator,
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
    metrics: Metrics,
    fleet_file: Path,
) -> None:
    await emulator.fault(kind="5xx", status=503, path_prefix="/v1/fleets")
    loop = reconciler(
        client, store, history, write_fleet(fleet_file, [vin(1)]), metrics=metrics,
        backoff_base_s=0.002,
    )  # fmt: skip
    cycles: list[tuple[ReconcileReport, float]] = []
    recovered = asyncio.Event()
    stop = asyncio.Event()

    def on_cycle(report: ReconcileReport, delay: float) -> None:
        cycles.append((report, delay))
        if len(cycles) == 4:
            asyncio.get_running_loop().create_task(emulator.clear_faults())
        if not report.failed:
            recovered.set()

    runner = asyncio.create_task(loop.run(interval_s=0.05, stop=stop, on_cycle=on_cycle))
    async with asyncio.timeout(20):
        await recovered.wait()
    stop.set()
    await runner  # returns: the loop never raised

    failures = [(report, delay) for report, delay in cycles if report.failed]
    assert len(failures) >= 4
    assert "answered 503: Server error: injected fault" in failures[0][0].errors[0]
    ceilings = [0.002 * 2**n for n in range(4)]
    for (_, delay), ceiling in zip(failures, ceilings, strict=False):
        assert ceiling / 2 <= delay <= ceiling
    assert cycles[-1][0].created[0].vin == vin(1)
    assert cycles[-1][1] == 0.05  # back to the normal interval
    assert loop.consecutive_failures == 0
    assert metrics.registry.get_sample_value(
        "hm_ingest_api_retries_total", {"cause": "server_error"}
    )


async def test_rate_limit_waits_what_hm_asked(
    emulator: Emulator,
    client: HmApiClient,
    store: ClearanceStateStore,
    history: TransitionHistory,
) -> None:
    await emulator.fault(kind="429", count=2, retry_after_s=7)
    loop = reconciler(client, store, history, None, backoff_base_s=0.002)
    report = await loop.reconcile_once()
    assert report.failed
    assert report.retry_after_s == 7
    assert loop._next_delay(report, interval_s=300) >= 7


async def test_wake_starts_the_next_cycle_now(
    client: HmApiClient, store: ClearanceStateStore, history: TransitionHistory
) -> None:
    loop = reconciler(client, store, history, None)
    stop = asyncio.Event()
    cycles = asyncio.Queue[ReconcileReport]()
    runner = asyncio.create_task(
        loop.run(interval_s=3600, stop=stop, on_cycle=lambda r, _: cycles.put_nowait(r))
    )
    async with asyncio.timeout(10):
        await cycles.get()
        loop.wake()
        await cycles.get()  # an hour early
    stop.set()
    async with asyncio.timeout(10):
        await runner


async def test_store_locked_by_another_process_is_a_failed_cycle_not_a_crash(
    client: HmApiClient, tmp_path: Path, fleet_file: Path
) -> None:
    path = tmp_path / "locked.sqlite3"
    with ClearanceStateStore(path, busy_timeout_ms=20) as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        loop = reconciler(
            client, store, None, write_fleet(fleet_file, [vin(1)]), backoff_base_s=0.002
        )
        cycles: list[ReconcileReport] = []
        done = asyncio.Event()
        stop = asyncio.Event()

        def on_cycle(report: ReconcileReport, _: float) -> None:
            cycles.append(report)
            if len(cycles) == 2:
                other.execute("ROLLBACK")
            if not report.failed:
                done.set()

        runner = asyncio.create_task(loop.run(interval_s=0.05, stop=stop, on_cycle=on_cycle))
        async with asyncio.timeout(20):
            await done.wait()
        stop.set()
        await runner
        other.close()
        assert "cannot write the clearance store" in cycles[0].errors[0]
        assert "database is locked" in cycles[0].errors[0]
        assert store.statuses() == {vin(1): "pending"}
