"""The daemon's side of fleet clearance: state, ingest gate, control loop and webhook, assembled.

``[fleet] enabled = true`` turns it on. The pieces live in :mod:`ingest.fleet`; this module only
wires them to the daemon:

* the sink judges every message's VIN by the store's refused VINs (a snapshot taken as each logged
  group is handed over), and routes rows of VINs known to be revoked, rejected or canceled to
  ``rejected/`` as ``not_cleared``;
* the webhook hands verified ``fleet_clearance_changed`` events to :meth:`on_webhook`, which records
  the new status at once (so the gate reacts within a delivery) and wakes the control loop;
* :meth:`run` is the control loop, one task in the daemon's TaskGroup. It never raises on HM API
  trouble (it backs off and reports), so an API outage never stops ingestion.

With several replicas (``[replica] id``), only the leader (see :mod:`ingest.replica.role`) runs
the mutating loop and exports the clearance history; the others run the same loop in
observe-only mode, which keeps their own clearance state (and so their ingest gate) in step with
HM's listing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ingest.config import Settings
from ingest.errors import IngestError
from ingest.fleet.apiclient import build_api_client
from ingest.fleet.history import TransitionHistory
from ingest.fleet.reconcile import Reconciler, SubscribedGate
from ingest.fleet.store import STORE_FILE, ClearanceStateStore
from ingest.hmapi import HmApiClient
from ingest.metrics import Metrics
from ingest.replica.role import Role
from ingest.storage import OutputStore
from ingest.webhook import ClearanceChange

log = logging.getLogger("ingest.control")


@dataclass
class FleetControl:
    store: ClearanceStateStore
    history: TransitionHistory
    client: HmApiClient
    reconciler: Reconciler
    interval_s: float
    # Observe-only twin of ``reconciler``, run while another replica leads (None: no replicas).
    follower: Reconciler | None = None
    leading: bool = True

    @classmethod
    def open(
        cls, settings: Settings, metrics: Metrics, *, subscribed: SubscribedGate | None = None
    ) -> FleetControl:
        """Open the clearance state and the API client; raises ConfigError on bad credentials.

        ``subscribed``: VIN-sharded replicas register a VIN only once its topic has a subscriber.
        """
        store = ClearanceStateStore(settings.state.path / STORE_FILE)
        try:
            client = build_api_client(settings.api, metrics=metrics)
        except BaseException:
            store.close()  # bad credentials stop start-up: leave no database handle open
            raise
        history = TransitionHistory(
            store,
            OutputStore.open(settings.output.path),
            compression_level=settings.output.compression_level,
            replica=settings.replica.id,
        )
        reconciler = Reconciler(
            client,
            store,
            history,
            desired_file=settings.fleet.file,
            prune=settings.fleet.prune,
            metrics=metrics,
            subscribed=subscribed,
        )
        mode = f"desired fleet {settings.fleet.file}" if settings.fleet.file else "observe-only"
        log.info(
            "fleet control: %s, every %.0f s%s",
            mode,
            settings.fleet.interval_s,
            ", prune on" if settings.fleet.prune else "",
        )
        follower = None
        if settings.replica.enabled:
            follower = Reconciler(client, store, None, desired_file=None, prune=False)
        return cls(
            store,
            history,
            client,
            reconciler,
            settings.fleet.interval_s,
            follower=follower,
            leading=follower is None,
        )

    async def on_webhook(self, change: ClearanceChange) -> None:
        # SQLite with fsync, and it may wait for a reconcile cycle's transaction: off the loop.
        await asyncio.to_thread(
            self.store.observe_status,
            change.vin,
            change.status,
            reason=change.reason,
            source="webhook",
            at=change.received_at,
        )
        self._active.wake()

    @property
    def _active(self) -> Reconciler:
        return self.reconciler if self.leading or self.follower is None else self.follower

    async def run(self, stop: asyncio.Event, role: Role | None = None) -> None:
        """The control loop; with ``role``, mutating while leading and observing otherwise."""
        if role is None or self.follower is None:
            await self.reconciler.run(interval_s=self.interval_s, stop=stop)
            return
        while not stop.is_set():
            role.changed.clear()
            await self._set_leading(role.leader)
            # The running loop ends at its next pause when the role changes (or on stop).
            until = asyncio.Event()
            loop = asyncio.create_task(
                self._active.run(interval_s=self.interval_s, stop=until), name="fleet-loop"
            )
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(role.changed.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                until.set()
                self._active.wake()
                await loop

    async def _set_leading(self, leading: bool) -> None:
        if leading and not self.leading:
            # Transitions this replica recorded while following were the leader's to export
            # (it observed the same listing); exporting them again would duplicate history rows.
            await asyncio.to_thread(self.history.skip_pending)
        self.leading = leading
        log.info(
            "fleet control: %s",
            "leading (mutating loop)" if leading else "following (observe-only)",
        )

    async def aclose(self) -> None:
        # Webhook transitions since the last cycle reach clearance/ now rather than next start.
        if self.leading:
            try:
                await asyncio.to_thread(self.history.export)
            except IngestError as exc:
                log.warning(
                    "clearance history not exported at shutdown (retried at start): %s", exc
                )
        await self.client.aclose()
        self.store.close()
