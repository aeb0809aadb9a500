"""FleetControl as one of several replicas, against the HM emulator over real HTTP.

A follower (``Role.leader`` false) runs the observe-only loop: it keeps its own clearance state
and gate in step with HM's listing but never registers or removes a VIN and never writes the
clearance history. The leader runs the mutating loop and exports only what it records after
taking over (``skip_pending``). The emulator's clock only moves when a test advances it, and the
loop runs every 50 ms, so each test takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from ingest.config import Settings
from ingest.control import FleetControl
from ingest.fleet import ClearanceStateStore, Reconciler
from ingest.fleet.store import NOT_CLEARED, STORE_FILE
from ingest.hmapi import HmApiClient, VehicleRequest
from ingest.metrics import Metrics
from ingest.replica.role import Role
from tests.daemon_support import read_table

from .conftest import STEP_S, Emulator, vin

INTERVAL_S = 0.05  # the control loop's interval: many cycles per test without sleeping long
TIMEOUT_S = 20.0


def replica_settings(emulator: Emulator, tmp_path: Path, fleet_file: Path) -> Settings:
    info = emulator.info
    return Settings.model_validate(
        {
            "mqtt": {"app_id": "replica-control-test"},
            "state": {"path": str(tmp_path / "state")},
            "output": {"path": str(tmp_path / "out")},
            "api": {
                "base_url": info["base_url"],
                "client_id": info["client_id"],
                "client_secret": info["client_secret"],
            },
            "fleet": {"enabled": True, "file": str(fleet_file), "interval_s": INTERVAL_S},
            "replica": {"id": "r0", "coordination": f"sqlite:///{tmp_path}/c.sqlite3"},
        }
    )


def write_fleet(path: Path, vins: Iterable[str]) -> Path:
    path.write_text("vin,brand\n" + "".join(f"{v},sandbox\n" for v in vins))
    return path


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {TIMEOUT_S:g} s waiting for {what}")
        await asyncio.sleep(0.01)


async def cycles(loop: Reconciler | None, count: int = 3) -> None:
    """Wait until ``loop`` finished ``count`` more cycles (each leaves a new last_report)."""
    assert loop is not None
    for _ in range(count):
        await until(_new_report(loop), "a control-loop cycle")


def _new_report(loop: Reconciler) -> Callable[[], bool]:
    previous = loop.last_report
    return lambda: loop.last_report is not previous


async def register(client: HmApiClient, *vins: str) -> None:
    """Ask HM for clearances directly, as another replica or an operator would."""
    results = await client.create_clearances([VehicleRequest(v, "sandbox") for v in vins])
    assert not [r for r in results if r.is_error], results


@dataclass
class Running:
    control: FleetControl
    role: Role

    async def set_leader(self, leader: bool) -> None:
        self.role.leader = leader
        self.role.changed.set()
        # `leading` flips only after the previous loop finished its cycle: from here on only the
        # new mode's loop talks to HM.
        await until(lambda: self.control.leading is leader, f"leading = {leader}")


@asynccontextmanager
async def running(settings: Settings, metrics: Metrics, *, leader: bool) -> AsyncIterator[Running]:
    control = FleetControl.open(settings, metrics)
    role = Role(leader=leader)
    stop = asyncio.Event()
    task = asyncio.create_task(control.run(stop, role), name="fleet-control")
    try:
        yield Running(control, role)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
        await control.aclose()


def clearance_rows(settings: Settings) -> set[tuple[str, str]]:
    assert isinstance(settings.output.path, Path)
    return {(r["vin"], r["to_status"]) for r in read_table(settings.output.path, "clearance")}


def clearance_files(settings: Settings) -> list[Path]:
    assert isinstance(settings.output.path, Path)
    return sorted((settings.output.path / "clearance").rglob("*.parquet"))


async def test_follower_never_registers_but_learns_hm_statuses(
    emulator: Emulator, client: HmApiClient, metrics: Metrics, tmp_path: Path
) -> None:
    kept, revoked = vin(10), vin(11)
    await register(client, kept, revoked)
    await emulator.advance(STEP_S)  # both approved
    await client.delete_clearance(revoked)
    await emulator.advance(STEP_S)
    assert await emulator.statuses() == {kept: "approved", revoked: "revoked"}
    fleet_file = write_fleet(tmp_path / "fleet.csv", [vin(1), vin(2)])
    settings = replica_settings(emulator, tmp_path, fleet_file)

    async with running(settings, metrics, leader=False) as replica:
        control = replica.control
        assert not control.leading
        await until(
            lambda: control.store.statuses() == {kept: "approved", revoked: "revoked"},
            "the follower to record HM's statuses",
        )
        await cycles(control.follower)
        # Several cycles with two desired VINs missing at HM, and none was requested.
        assert await emulator.statuses() == {kept: "approved", revoked: "revoked"}
        assert control.store.refusal(revoked) == NOT_CLEARED
        assert control.store.refusal(kept) is None
        # Unknown to HM: let through, as a single daemon does.
        assert control.store.refusal(vin(1)) is None
    assert clearance_files(settings) == []  # the follower wrote no history


async def test_becoming_leader_registers_and_following_again_stops_mutating(
    emulator: Emulator, metrics: Metrics, tmp_path: Path
) -> None:
    fleet_file = write_fleet(tmp_path / "fleet.csv", [vin(1), vin(2)])
    settings = replica_settings(emulator, tmp_path, fleet_file)

    async with running(settings, metrics, leader=False) as replica:
        control = replica.control
        await cycles(control.follower)
        assert await emulator.statuses() == {}

        await replica.set_leader(True)
        await cycles(control.reconciler, 1)
        assert await emulator.statuses() == {vin(1): "pending", vin(2): "pending"}

        await replica.set_leader(False)
        write_fleet(fleet_file, [vin(1), vin(2), vin(3)])
        await emulator.advance(STEP_S)  # the two become approved: the follower still observes
        await until(
            lambda: control.store.statuses() == {vin(1): "approved", vin(2): "approved"},
            "the follower to record the approvals",
        )
        await cycles(control.follower)
        assert await emulator.statuses() == {vin(1): "approved", vin(2): "approved"}


async def test_leader_exports_only_what_it_recorded_after_taking_over(
    emulator: Emulator, client: HmApiClient, metrics: Metrics, tmp_path: Path
) -> None:
    before, during = vin(10), vin(11)  # registered at HM by someone else
    await register(client, before)
    await emulator.advance(STEP_S)  # approved before this replica starts
    fleet_file = write_fleet(tmp_path / "fleet.csv", [vin(1)])
    settings = replica_settings(emulator, tmp_path, fleet_file)

    async with running(settings, metrics, leader=False) as replica:
        control = replica.control
        await register(client, during)
        await until(
            lambda: control.store.statuses() == {before: "approved", during: "pending"},
            "the follower to record both",
        )
        assert control.store.unexported() == 2  # recorded, left to the leader of the time

        await replica.set_leader(True)
        await until(lambda: vin(1) in control.store.statuses(), "the leader to register vin 1")
        await emulator.advance(STEP_S)  # vin 1 and `during` approved
        await until(
            lambda: (
                control.store.statuses()
                == {before: "approved", during: "approved", vin(1): "approved"}
                and control.store.unexported() == 0
            ),
            "the leader to record and export the approvals",
        )
        # What it recorded as a follower (before approved, during pending) is not in its history.
        exported = {(vin(1), "pending"), (vin(1), "approved"), (during, "approved")}
        assert clearance_rows(settings) == exported
        assert all("-r0-" in path.name for path in clearance_files(settings))

        await replica.set_leader(False)
        await client.delete_clearance(vin(1))
        await emulator.advance(STEP_S)
        await until(
            lambda: control.store.statuses().get(vin(1)) == "revoked",
            "the follower to record the revocation",
        )
        files = clearance_files(settings)
    # Leaving the block ran aclose() as a follower: no export of the revocation.
    assert clearance_files(settings) == files
    assert clearance_rows(settings) == exported
    with ClearanceStateStore(settings.state.path / STORE_FILE) as store:
        assert store.unexported() >= 1
