"""A replica's life in its group: join, heartbeat, leader election, adoption of lost replicas.

One :class:`ReplicaRuntime` per daemon with ``[replica] id`` set. Its :meth:`run` task renews this
replica's membership lease every ``heartbeat_s`` and competes for the leader lease. The leader:

* runs the mutating fleet control loop (:class:`Role` tells :class:`~ingest.control.FleetControl`;
  followers only observe HM's clearance listing for their own ingest gate);
* adopts the persistent MQTT session of every replica whose lease has expired
  (:mod:`ingest.replica.adopt`), so that replica's share of the stream is not left queued on the
  broker until it returns.

Fencing: a heartbeat that finds this replica declared lost (its lease expired and a drain claim
exists) stops the daemon at once (``on_fenced``). It restarts, waits in :meth:`join` until the
adoption is over, loads the adopted message keys into its dedupe index and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import ParamSpec, TypeVar

from ingest.config import Settings
from ingest.dedupe import DedupeIndex
from ingest.errors import IngestError
from ingest.metrics import Metrics
from ingest.replica.coordination import Coordinator
from ingest.replica.role import Role

log = logging.getLogger("ingest.replica")

P = ParamSpec("P")
T = TypeVar("T")


class ReplicaRuntime:
    def __init__(
        self,
        coordinator: Coordinator,
        *,
        heartbeat_s: float,
        metrics: Metrics | None = None,
        members: Sequence[str] = (),
    ) -> None:
        """``members``: the configured member list (VIN-sharded mode), each of which must have
        a session someone holds; empty in shared mode, where only members that ran count."""
        self.coordinator = coordinator
        self.configured_members = list(members)
        # The group's list: the leader's (published in the coordination database), so replicas
        # whose configurations differ during a rolling change still agree on every VIN's owner.
        self.members = list(members)
        # Every list the leader published, by epoch, and the epoch of ``members`` (0: none yet).
        self.member_lists: dict[int, list[str]] = {}
        self.epoch = 0
        # When the group settled after each list (ingest.replica.handover), by epoch.
        self.settled_at: dict[int, float] = {}
        self._metrics = metrics
        self.replica = coordinator.replica
        self.role = Role()
        self.fenced = False
        self._heartbeat_s = heartbeat_s
        # One database connection, used from asyncio.to_thread workers and adopter threads.
        self._lock = threading.Lock()
        self._adoptions: dict[str, asyncio.Task[None]] = {}

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a coordinator method under the connection's lock (any thread)."""
        with self._lock:
            return fn(*args, **kwargs)

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(lambda: self.call(fn, *args, **kwargs))

    # -- start-up -----------------------------------------------------------------------------

    async def join(self, stop: asyncio.Event) -> bool:
        """Become a member; wait while another replica is still adopting our old session.

        Returns False when ``stop`` was set first.
        """
        waited = False
        while not stop.is_set():
            try:
                if await self._call(self.coordinator.try_join):
                    await self.follow_members()
                    if waited:
                        log.info("replica %s: the adoption of its session is over", self.replica)
                    log.info("replica %s joined its group", self.replica)
                    return True
                message = (
                    "another replica holds its session; asked for it back"
                    if self.configured_members
                    else "its previous session is being adopted by the leader"
                )
            except IngestError as exc:
                message = f"coordination database unavailable: {exc}"
            log.warning("replica %s waiting to join: %s", self.replica, message)
            waited = True
            await _sleep(stop, self._heartbeat_s)
        return False

    def load_adopted(self, dedupe: DedupeIndex) -> int:
        """Mark the keys other replicas adopted from us as seen, before our log is replayed.

        They are recorded at lsn 0, below any lsn of ours, so every logged copy is a repeat.
        Forgotten in the database only once the dedupe index holds them (a crash in between
        loads them again, which changes nothing).
        """
        keys = self.call(self.coordinator.adopted_keys)
        if not keys:
            return 0
        now_us = time.time_ns() // 1000
        dedupe.record([(key, 0, now_us) for key in keys])
        self.call(self.coordinator.forget_adopted, keys)
        log.info(
            "replica %s: %d message(s) were adopted by another replica while it was away; "
            "logged copies of them are skipped",
            self.replica,
            len(keys),
        )
        return len(keys)

    # -- running ------------------------------------------------------------------------------

    async def run(
        self,
        stop: asyncio.Event,
        *,
        adopt: Callable[[str], Awaitable[None]],
        on_fenced: Callable[[], None],
    ) -> None:
        """Heartbeat, lead when possible and adopt lost members, until ``stop`` or fencing."""
        try:
            while not stop.is_set():
                try:
                    if not await self._call(self.coordinator.heartbeat):
                        self.fenced = True
                        log.error(
                            "replica %s was declared lost by its group (lease expired) and its "
                            "session adopted: stopping now so it rejoins cleanly",
                            self.replica,
                        )
                        on_fenced()
                        return
                    self._set_leader(await self._call(self.coordinator.try_lead))
                    await self.follow_members()
                    if self.role.leader:
                        await self._adopt_lost_members(adopt)
                except IngestError as exc:
                    # Nobody can declare us lost while the database is unreachable either.
                    log.warning("replica %s: coordination failed, retrying: %s", self.replica, exc)
                await _sleep(stop, self._heartbeat_s)
        finally:
            await self._stop_adoptions()
            if self.role.leader and not self.fenced:
                try:
                    # Hand over now rather than after the lease runs out.
                    await self._call(self.coordinator.resign)
                except IngestError as exc:
                    log.warning("replica %s: could not resign leadership: %s", self.replica, exc)
                self._set_leader(False)

    async def follow_members(self) -> None:
        """VIN-sharded mode: the leader publishes its configured member list; everyone (the
        leader too) hashes over the published one."""
        if not self.configured_members:
            return
        lists = await self._call(self.coordinator.member_lists)
        published = lists[max(lists)] if lists else None
        # A write only when the list changes, not one per heartbeat.
        if (
            self.role.leader
            and published != self.configured_members
            and await self._call(self.coordinator.publish_members, self.configured_members)
        ):
            lists = await self._call(self.coordinator.member_lists)
            published = lists[max(lists)]
        if lists:
            # Replaced, never changed in place: the intake thread reads both.
            self.settled_at = await self._call(self.coordinator.settled_times)
            self.member_lists, self.epoch = lists, max(lists)
        if published is None or published == self.members:
            return
        log.warning(
            "replica %s: the group's member list is now %s (the leader's)%s",
            self.replica,
            ",".join(published),
            ""
            if published == self.configured_members
            else f"; this replica's [replica] members is {','.join(self.configured_members)}",
        )
        self.members = published

    def member_list(self, epoch: int) -> list[str] | None:
        """The member list of ``epoch``, read from the database if this replica has not seen it
        yet (any thread); None if it does not exist or the database cannot be read now."""
        members = self.member_lists.get(epoch)
        if members is None and epoch > self.epoch:
            try:
                members = self.call(self.coordinator.member_lists).get(epoch)
            except IngestError as exc:
                log.warning("replica %s: member list %d not read: %s", self.replica, epoch, exc)
        return members

    def _set_leader(self, leading: bool) -> None:
        if leading == self.role.leader:
            return
        self.role.leader = leading
        self.role.changed.set()
        if self._metrics is not None:
            self._metrics.replica_leader.set(1 if leading else 0)
        log.info(
            "replica %s %s", self.replica, "is now the leader" if leading else "is now a follower"
        )

    async def _adopt_lost_members(self, adopt: Callable[[str], Awaitable[None]]) -> None:
        for task_member in [m for m, t in self._adoptions.items() if t.done()]:
            del self._adoptions[task_member]
        if self.configured_members:
            await self._call(self.coordinator.ensure_members, self.members)
        for member in await self._call(self.coordinator.members):
            name = member.replica
            if member.alive or name == self.replica or name in self._adoptions:
                continue
            if await self._call(self.coordinator.try_claim_drain, name):
                log.warning(
                    "replica %s lost its lease: %s its session so its share of the "
                    "stream is not left queued on the broker",
                    name,
                    "hosting" if self.configured_members else "adopting",
                )
                self._adoptions[name] = asyncio.create_task(
                    self._adopt(name, adopt), name=f"adopt-{name}"
                )

    async def _adopt(self, member: str, adopt: Callable[[str], Awaitable[None]]) -> None:
        try:
            await adopt(member)
            await self._call(self.coordinator.finish_drain, member)
        except IngestError as exc:
            # The claim stays ours until it expires; the next heartbeat round claims it again.
            log.warning("adoption of replica %s failed, retried: %s", member, exc)

    async def _stop_adoptions(self) -> None:
        tasks = list(self._adoptions.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def open_replica_runtime(settings: Settings, metrics: Metrics | None = None) -> ReplicaRuntime:
    """Connect to ``[replica] coordination``; raises ConfigError when it cannot be used."""
    replica = settings.replica
    coordinator = Coordinator.open(
        replica.coordination.get_secret_value(), replica=replica.id, lease_s=replica.lease_s
    )
    return ReplicaRuntime(
        coordinator,
        heartbeat_s=replica.heartbeat_s,
        metrics=metrics,
        members=replica.members if replica.vin_sharded else (),
    )
