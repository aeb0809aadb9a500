"""VIN-sharded replicas (``[replica] mode = "vin"``): the daemon's side, as two coroutines.

* :meth:`VinSharding.keep_subscriptions` keeps this replica's own session subscribed to the
  topics of the VINs it owns (:mod:`ingest.replica.subscriptions`), every heartbeat.
* :meth:`VinSharding.host` is what the leader does with a lost replica here. In shared mode its
  session is drained and deleted (:mod:`ingest.replica.adopt`): the broker spreads new messages
  over the live members anyway. Here nobody else subscribes the lost replica's VINs, so its
  session must stay: the leader *hosts* it (connected under its client id, its messages into the
  leader's own pipeline, its subscriptions kept in step with the fleet) until the replica asks
  for it back, then hands it over without losing or repeating a message (see :meth:`host`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ingest.errors import BrokerError, IngestError
from ingest.metrics import Metrics
from ingest.mqtt import FilterSession
from ingest.replica.coordination import CoordinationError
from ingest.replica.handover import open_epochs, overlapping
from ingest.replica.host import SessionHost
from ingest.replica.runtime import ReplicaRuntime
from ingest.replica.subscriptions import SubscriptionSync

log = logging.getLogger("ingest.replica.vin_mode")

# How long a hosted session may take to connect, and to hand back what it holds.
HOST_CONNECT_TIMEOUT_S = 30.0
RELEASE_TIMEOUT_S = 30.0
# How often the host renews its claim and looks for a request to hand the session back.
HOST_POLL_S = 1.0

# Builds the host of a member's session, given the subscriptions it is to keep.
HostFactory = Callable[[str, SubscriptionSync], SessionHost]


@dataclass
class VinSharding:
    runtime: ReplicaRuntime
    prefix: str  # live/level13/<app>
    vins: Callable[[], set[str] | frozenset[str]]
    interval_s: float
    metrics: Metrics
    # Every session takes the V2 topic and keeps its VINs' envelopes (ingest.replica.envelopes).
    envelopes: bool = False
    # [replica] handover_window_s (ingest.replica.handover).
    handover_window_s: float = 900.0
    # The newest list whose claims were deleted after its window closed.
    _claims_forgotten_for: int = 0

    def sync_for(self, member: str) -> SubscriptionSync:
        return SubscriptionSync(
            member=member,
            members=lambda: self.runtime.members,
            prefix=self.prefix,
            runtime=self.runtime,
            vins=self.vins,
            envelopes=self.envelopes,
        )

    async def keep_subscriptions(
        self, sync: SubscriptionSync, session: FilterSession, stop: asyncio.Event
    ) -> None:
        """Reconcile our own session's subscriptions every ``interval_s`` until ``stop``."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(sync.step, session)
                self.metrics.topic_filters.set(len(sync.held()))
                rule = sync.rule()
                self.metrics.envelope_rule_lists.set(0 if rule is None else rule.hi - rule.lo + 1)
                if self.runtime.role.leader:
                    await asyncio.to_thread(self.settle_handovers)
            except IngestError as exc:
                # Not connected right now, or the database is away: the next round retries.
                log.warning("subscriptions not brought in step yet, retrying: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    def settle_handovers(self) -> None:
        """The leader's part in handovers (ingest.replica.handover): record when the group
        settled after a member list, and delete the claims once every list's window is over."""
        runtime = self.runtime
        lists, settled_at = runtime.member_lists, runtime.settled_at
        epoch = runtime.epoch
        unsettled = [e for e in lists if e > 1 and e not in settled_at]
        if unsettled:
            why = overlapping(
                runtime.call(runtime.coordinator.subscriptions),
                prefix=self.prefix,
                members=lists[epoch],
                epoch=epoch,
                envelopes=self.envelopes,
            )
            if why is not None:
                log.debug("member list %d not settled yet: %s", epoch, why)
                return
            runtime.call(runtime.coordinator.mark_settled, unsettled)
            log.info(
                "the group settled on member list %d: every VIN with one session, its owner's; "
                "moved VINs' messages are claimed for %.0f s more",
                epoch,
                self.handover_window_s,
            )
            return
        if epoch > max(self._claims_forgotten_for, 1) and not open_epochs(
            lists, settled_at, time.time(), self.handover_window_s
        ):
            forgotten = runtime.call(runtime.coordinator.forget_claims)
            self._claims_forgotten_for = epoch
            if forgotten:
                log.info("deleted %d handover claim(s): no VIN is changing owner", forgotten)

    async def host(self, member: str, make_host: HostFactory) -> bool:
        """Host ``member``'s session until it asks for it back, or raise.

        Returns True when ``member`` is no longer in the member list and its session holds no
        filter any more (its VINs' new owners took them over): the session is retired, and the
        caller drains and deletes it (:mod:`ingest.replica.adopt`); False after a hand-back.

        Raises IngestError when hosting ends on its own (connection lost, claim lost): the
        runtime's next heartbeat claims the member again and hosts it anew. Cancelled (we shut
        down), it hands the session back to the broker the same clean way and drops the claim,
        so the next leader hosts it without waiting for the claim to expire.
        """
        coordinator = self.runtime.coordinator
        sync = self.sync_for(member)
        host = make_host(member, sync)
        host.start()
        self.metrics.hosted_sessions.inc()
        handed_back = retired = False
        try:
            present = await asyncio.to_thread(host.wait_connected, HOST_CONNECT_TIMEOUT_S)
            self.metrics.replica_adoptions.inc()
            log.warning(
                "hosting the session of replica %s (session present: %s) until it returns",
                member,
                present,
            )
            while True:
                if host.ended is not None:
                    raise BrokerError(
                        f"hosting replica {member}'s session ended: {host.ended}", retriable=True
                    )
                state = await asyncio.to_thread(
                    self.runtime.call, coordinator.renew_hosting, member
                )
                if state == "lost":
                    raise CoordinationError(
                        f"the claim on replica {member} is no longer ours; stopped hosting it",
                        retriable=True,
                    )
                if state == "release":
                    break
                try:
                    await asyncio.to_thread(sync.step, host)
                except IngestError as exc:
                    log.warning("replica %s's subscriptions not in step yet: %s", member, exc)
                if member not in self.runtime.members and not sync.held():
                    retired = True
                    break
                await asyncio.sleep(HOST_POLL_S)
            await asyncio.to_thread(host.release, RELEASE_TIMEOUT_S)
            handed_back = True
            log.info(
                "released the session of replica %s (%d message(s) taken while hosting, %d of "
                "them redeliveries its previous holder had logged)%s",
                member,
                host.messages,
                host.logged_before,
                "; it left the member list and its VINs have new owners: deleting the session"
                if retired
                else "",
            )
            self.metrics.adopted_messages.inc(host.messages)
            return retired
        finally:
            if not handed_back:
                await self._hand_back_to_broker(member, host)
            self.metrics.hosted_sessions.dec()

    async def _hand_back_to_broker(self, member: str, host: SessionHost) -> None:
        # Runs on errors and on cancellation (shutdown): release what we hold the clean way.
        try:
            await asyncio.to_thread(host.release, RELEASE_TIMEOUT_S)
            log.info(
                "handed the session of replica %s back to the broker (%d message(s) taken while "
                "hosting); the next leader hosts it",
                member,
                host.messages,
            )
        except IngestError as exc:
            log.error(
                "replica %s's session not handed back cleanly (%s); messages this replica "
                "logged but had not acknowledged may be written again by the next holder",
                member,
                exc,
            )
            await asyncio.to_thread(host.stop)
        self.metrics.adopted_messages.inc(host.messages)
        with contextlib.suppress(IngestError):
            await asyncio.to_thread(
                self.runtime.call, self.runtime.coordinator.abandon_drain, member
            )
