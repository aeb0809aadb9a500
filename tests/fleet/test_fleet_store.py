"""ClearanceStateStore: transitions, gone VINs, the gate, persistence, two processes sharing it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.fleet import ClearanceStateStore
from ingest.fleet.store import GONE, NOT_CLEARED
from ingest.hmapi import ChangelogEntry, Clearance

from .conftest import vin

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def clearance(number: int, status: str, reason: str | None = None) -> Clearance:
    changed = T0 - timedelta(hours=1)
    return Clearance(vin(number), status, "bmw", {}, (ChangelogEntry(changed, status, reason),))


def test_observe_records_changes_only(store: ClearanceStateStore) -> None:
    first = store.observe([clearance(1, "pending")], source="reconcile", at=T0, complete=True)
    assert [(t.from_status, t.to_status) for t in first] == [(None, "pending")]
    again = store.observe([clearance(1, "pending")], source="reconcile", at=T0, complete=True)
    assert again == []
    later = T0 + timedelta(minutes=5)
    [rejected] = store.observe(
        [clearance(1, "rejected", "vehicle_not_supported")],
        source="reconcile",
        at=later,
        complete=True,
    )
    assert rejected.from_status == "pending"
    assert rejected.reason == "vehicle_not_supported"
    assert rejected.observed_at == later
    assert rejected.changed_at == T0 - timedelta(hours=1)
    assert rejected.brand == "bmw"
    assert [t.to_status for t in store.transitions(vin(1))] == ["pending", "rejected"]


def test_complete_listing_marks_missing_vins_gone(store: ClearanceStateStore) -> None:
    store.observe(
        [clearance(1, "approved"), clearance(2, "revoked")],
        source="reconcile",
        at=T0,
        complete=True,
    )
    partial = store.observe([clearance(1, "approved")], source="request", at=T0, complete=False)
    assert partial == []
    [gone] = store.observe([clearance(1, "approved")], source="reconcile", at=T0, complete=True)
    assert (gone.vin, gone.from_status, gone.to_status) == (vin(2), "revoked", GONE)
    # Gone means we know nothing any more: data is let through again.
    assert store.refusal(vin(2)) is None
    [back] = store.observe(
        [clearance(1, "approved"), clearance(2, "pending")], source="reconcile", at=T0,
        complete=True,
    )  # fmt: skip
    assert (back.from_status, back.to_status) == (GONE, "pending")


@pytest.mark.parametrize(
    ("status", "refused"),
    [
        ("revoked", True),
        ("rejected", True),
        ("canceled", True),
        ("pending", False),
        ("approved", False),
        ("revoking", False),
        ("canceling", False),
        ("suspended", False),
    ],
)
def test_gate(store: ClearanceStateStore, status: str, refused: bool) -> None:
    store.observe([clearance(1, status)], source="reconcile", at=T0, complete=True)
    assert store.refusal(vin(1)) == (NOT_CLEARED if refused else None)
    assert store.refusal(vin(2)) is None  # unknown VIN: never drop data on missing knowledge


def test_gate_follows_webhook_statuses_and_needs_no_database(
    store: ClearanceStateStore,
) -> None:
    store.observe_status(vin(1), "approved", reason=None, source="webhook", at=T0)
    assert store.refusal(vin(1)) is None
    transition = store.observe_status(vin(1), "revoked", reason=None, source="webhook", at=T0)
    assert transition is not None
    assert transition.from_status == "approved"
    assert store.observe_status(vin(1), "revoked", reason=None, source="webhook", at=T0) is None
    store.close()
    # The sink thread's call reads the in-memory snapshot only: it still answers after close.
    answers: list[str | None] = []
    reader = threading.Thread(target=lambda: answers.append(store.refusal(vin(1))))
    reader.start()
    reader.join()
    assert answers == [NOT_CLEARED]


def test_listing_older_than_a_webhook_does_not_overwrite_it(store: ClearanceStateStore) -> None:
    store.observe([clearance(1, "pending"), clearance(2, "pending")], source="reconcile", at=T0,
                  complete=True)  # fmt: skip
    mark = store.generation()
    # The webhook lands while the listing request is in flight...
    store.observe_status(vin(1), "approved", reason=None, source="webhook", at=T0)
    # ...and the listing, produced before it, still says pending (and lacks VIN 2 entirely).
    changes = store.observe([clearance(1, "pending")], source="reconcile", at=T0, complete=True,
                            as_of=mark)  # fmt: skip
    assert [(t.vin, t.to_status) for t in changes] == [(vin(2), GONE)]
    assert store.statuses()[vin(1)] == "approved"


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "clearance.sqlite3"
    with ClearanceStateStore(path) as first:
        first.observe([clearance(1, "approved"), clearance(2, "rejected", "why")],
                      source="reconcile", at=T0, complete=True)  # fmt: skip
        first.observe_status(vin(1), "revoking", reason=None, source="request", at=T0)
    with ClearanceStateStore(path) as again:
        assert again.statuses() == {vin(1): "revoking", vin(2): "rejected"}
        assert again.counts() == {"revoking": 1, "rejected": 1}
        assert again.refusal(vin(2)) == NOT_CLEARED
        assert [t.to_status for t in again.transitions(vin(1))] == ["approved", "revoking"]
        assert again.transitions(vin(2))[0].reason == "why"
        assert again.unexported() == 3


def test_two_processes_sharing_the_file_record_a_change_once(tmp_path: Path) -> None:
    path = tmp_path / "clearance.sqlite3"
    with ClearanceStateStore(path) as daemon, ClearanceStateStore(path) as cli:
        daemon.observe([clearance(1, "approved")], source="reconcile", at=T0, complete=True)
        cli.observe([clearance(1, "revoking")], source="cli", at=T0, complete=False)
        # The daemon's next listing agrees with what the CLI recorded: no second transition.
        assert (
            daemon.observe([clearance(1, "revoking")], source="reconcile", at=T0, complete=True)
            == []
        )
        assert daemon.statuses() == {vin(1): "revoking"}
        assert [t.source for t in daemon.transitions(vin(1))] == ["reconcile", "cli"]


def test_unknown_source_is_refused(store: ClearanceStateStore) -> None:
    with pytest.raises(ValueError, match="source 'poll'"):
        store.observe([], source="poll", at=T0, complete=False)
