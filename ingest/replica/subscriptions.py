"""VIN-sharded mode: keeps one MQTT session's subscriptions equal to the VINs its member owns.

One :class:`SubscriptionSync` per session this daemon holds: its own, and each lost replica's it
hosts (:mod:`ingest.replica.host`). :meth:`SubscriptionSync.step` runs every heartbeat:

1. the VINs: every VIN of the clearance state (whatever its status: HM streams only what is
   approved, and a filter costs the broker next to nothing) plus the desired fleet file's, which
   the leader is about to register;
2. the filters its member owns (:func:`ingest.replica.shards.filters_of`);
3. SUBSCRIBE the missing ones, then record them in the coordination database. The leader
   registers a VIN at HM only once its filter is recorded, so its first message has a subscriber;
4. with ``envelopes`` (MQTT 5), before the rest: the V2 topic with this session's envelope rule
   (:mod:`ingest.replica.envelopes`), widened on a new member list and narrowed once every
   member's session covers it; without, the V2 topic is one more filter with one owner;
5. a filter another session holds (its VIN moved here), or a rule taking on a new list, only once
   every session concerned has recorded that its intake reads by the new list, so it claims the
   moved VINs' messages from then on (:mod:`ingest.replica.handover`): a message both sessions
   receive is then written once;
6. UNSUBSCRIBE a filter this member no longer owns (the member list changed) only once another
   session has recorded it: the new owner subscribes first. Dropping it first would open a gap
   in which the broker discards that VIN's messages; the overlap instead delivers a message
   published in it to both sessions (see docs/scaling.md). Whether it may go is decided and
   marked in one transaction (:meth:`Coordinator.mark_leaving`), so two sessions can never both
   let one filter go.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ingest.errors import ConfigError
from ingest.fleet.desired import load_desired_fleet
from ingest.mqtt import FilterSession, SubscriptionIds
from ingest.replica.coordination import Coordinator
from ingest.replica.envelopes import RULE_RECORD, EnvelopeRule, next_rule, rules_of
from ingest.replica.runtime import ReplicaRuntime
from ingest.replica.shards import filters_of, vin_filter

log = logging.getLogger("ingest.replica.subscriptions")

# How many leases a new owner waits for a session that has not recorded a new member list
# (neither it nor a host for it heartbeats) before taking the moved VINs anyway: their messages
# may then be written twice, which beats a VIN left to a session nobody runs.
KNOWN_LIST_WAIT_LEASES = 3.0


@dataclass(frozen=True, slots=True)
class SyncReport:
    subscribed: int = 0
    unsubscribed: int = 0
    # Filters this member no longer owns, kept until their new owner has subscribed.
    awaiting_new_owner: int = 0
    # Filters this member now owns, not subscribed until their holder reads by the new list.
    awaiting_handover: int = 0


@dataclass
class DesiredVins:
    """The desired fleet file's VINs, re-read only when the file changes."""

    path: Path | None
    _mtime_ns: int = -1
    _vins: frozenset[str] = field(default_factory=frozenset)

    def __call__(self) -> frozenset[str]:
        if self.path is None:
            return self._vins
        try:
            mtime_ns = self.path.stat().st_mtime_ns
            if mtime_ns != self._mtime_ns:
                self._vins = frozenset(v.vin for v in load_desired_fleet(self.path))
                self._mtime_ns = mtime_ns
        except (OSError, ConfigError) as exc:
            # The fleet control loop reports the bad file; keep the last good VINs meanwhile.
            log.debug("desired fleet not re-read for subscriptions: %s", exc)
        return self._vins


class SubscriptionSync:
    def __init__(
        self,
        *,
        member: str,
        members: Callable[[], Sequence[str]],
        prefix: str,
        runtime: ReplicaRuntime,
        vins: Callable[[], set[str] | frozenset[str]],
        envelopes: bool = False,
    ) -> None:
        """``member``: whose session (this replica, or the one hosted); ``members``: the group's
        member list now (the leader's, :attr:`ReplicaRuntime.members`); ``vins``: the VINs;
        ``envelopes``: every session takes the V2 topic under an envelope rule (MQTT 5)."""
        self.member = member
        self._members = members
        self._prefix = prefix
        self._runtime = runtime
        self._coordinator = runtime.coordinator
        self._vins = vins
        self._envelopes = envelopes
        # The filters the session holds as recorded (with its envelope rule's record), and those
        # of them it is leaving (loaded on first use).
        self._held: set[str] | None = None
        self._leaving: set[str] = set()
        # The envelope rule of a SUBSCRIBE in progress: the identifier it goes out with.
        self._rule_sent: EnvelopeRule | None = None
        # The newest member list recorded as read by this session's intake.
        self._known = 0
        # (epoch, since when) a session concerned has not recorded the list: see _behind.
        self._waiting: tuple[int, float] | None = None
        # The newest list whose wait ran out (its warning is logged once).
        self._gave_up_on = 0

    def held(self) -> list[str]:
        """What the session holds: subscribed again when the broker lost the session."""
        records = self._records()
        held = {f for f in records if not f.startswith(RULE_RECORD)}
        if self._rule_sent is not None or self.rule() is not None:
            held.add(self._prefix)
        return sorted(held)

    def _records(self) -> set[str]:
        # Replaced, never changed in place: the session thread reads it (held() at a reconnect,
        # subscription_id() for each SUBSCRIBE) while a step runs on another thread.
        if self._held is None:
            held = self._runtime.call(self._coordinator.subscribed, self.member)
            rules = sorted(f for f in held if f.startswith(RULE_RECORD))
            if rules and not self._envelopes:
                # Back from MQTT 5 to 3.1.1: the session still holds the V2 topic, now a filter
                # like any other (kept by its one owner, let go by the others once it holds it).
                self._runtime.call(
                    self._coordinator.replace_subscribed, self.member, rules, [self._prefix]
                )
                held = (held - set(rules)) | {self._prefix}
            self._held = held
            self._leaving = self._runtime.call(self._coordinator.leaving, self.member)
        return self._held

    def rule(self) -> EnvelopeRule | None:
        """The envelope rule the session holds the V2 topic with (envelopes mode), or None.

        A V2 topic held without one (the topic's single owner before rules: a configuration
        that just moved to MQTT 5) keeps every envelope until its rule is set.
        """
        if not self._envelopes:
            return None
        records = self._records()
        for record in records:
            if (rule := EnvelopeRule.from_record(record)) is not None:
                return rule
        if self._prefix in records:
            return EnvelopeRule(0, max(self._runtime.epoch, 1))
        return None

    @property
    def subscription_ids(self) -> SubscriptionIds | None:
        """What the session subscribes each filter with: :meth:`subscription_id` when it takes
        the V2 topic under an envelope rule, else None (no identifiers)."""
        return self.subscription_id if self._envelopes else None

    def subscription_id(self, topic_filter: str) -> int | None:
        """The Subscription Identifier to subscribe ``topic_filter`` with (session thread too)."""
        if topic_filter != self._prefix:
            return None
        rule = self._rule_sent or self.rule()
        return rule.identifier if rule is not None else None

    def desired(self) -> set[str]:
        """The filters this member owns (without the V2 topic in envelopes mode: see rule())."""
        return filters_of(
            self.member,
            self._members(),
            self._prefix,
            self._vins(),
            app_topic=not self._envelopes,
        )

    def step(self, session: FilterSession) -> SyncReport:
        """One reconciliation of ``session``'s subscriptions (blocking: run it in a thread).

        Raises BrokerError when the session cannot subscribe now (the next step retries), or
        CoordinationError when the database is unreachable.
        """
        self._record_known()
        if self._envelopes:
            self._step_envelopes(session)
        held = set(self.held())
        if self._envelopes:
            held.discard(self._prefix)  # the envelope rule's, never surplus
        desired = self.desired()
        # A filter it was leaving and owns again (the member list changed back) is subscribed
        # again too: its UNSUBSCRIBE may have gone out already.
        missing = sorted((desired - held) | (desired & self._leaving))
        held_elsewhere = self._waiting_for_others(missing)
        missing = [f for f in missing if f not in held_elsewhere]
        if missing:
            session.subscribe(missing)
            self._runtime.call(self._coordinator.record_subscribed, self.member, missing)
            self._held = self._records() | set(missing)
            held.update(missing)
            self._leaving.difference_update(missing)
            log.info(
                "replica %s: subscribed %d topic filter(s) (%d held)",
                self.member,
                len(missing),
                len(held),
            )
        surplus = sorted(held - desired)
        if not surplus:
            return SyncReport(subscribed=len(missing), awaiting_handover=len(held_elsewhere))
        leaving = self._runtime.call(self._coordinator.mark_leaving, self.member, surplus)
        if leaving:
            self._leaving.update(leaving)
            session.unsubscribe(leaving)
            self._runtime.call(self._coordinator.forget_subscribed, self.member, leaving)
            self._held = self._records() - set(leaving)
            self._leaving.difference_update(leaving)
            log.info(
                "replica %s: unsubscribed %d topic filter(s) their new owner now holds",
                self.member,
                len(leaving),
            )
        return SyncReport(
            subscribed=len(missing),
            unsubscribed=len(leaving),
            awaiting_new_owner=len(surplus) - len(leaving),
            awaiting_handover=len(held_elsewhere),
        )

    def _record_known(self) -> None:
        """Record that this session's intake reads by the newest list (it does: the intake reads
        the same runtime), before this step acts on that list."""
        epoch = self._runtime.epoch
        if epoch and epoch != self._known:
            self._runtime.call(self._coordinator.record_known, self.member, epoch)
            self._known = epoch

    def _waiting_for_others(self, missing: Sequence[str]) -> set[str]:
        """Of ``missing``, the filters another session holds that has not recorded the newest
        list yet: subscribing them now would route messages to a session not claiming them."""
        if not missing:
            return set()
        subscriptions = self._runtime.call(self._coordinator.subscriptions)
        others = {f: subscriptions.get(f, set()) - {self.member} for f in missing}
        behind = self._behind({h for holders in others.values() for h in holders})
        return {f for f, holders in others.items() if holders & behind}

    def _behind(self, sessions: Collection[str]) -> set[str]:
        """Of ``sessions``, those that have not recorded the newest list, if we still wait."""
        epoch = self._runtime.epoch
        if not sessions or not epoch:
            return set()
        known = self._runtime.call(self._coordinator.known_epochs)
        behind = {s for s in sessions if known.get(s, 0) < epoch}
        if not behind:
            return set()
        now = time.monotonic()
        wait_s = KNOWN_LIST_WAIT_LEASES * self._coordinator.lease_s
        if self._waiting is None or self._waiting[0] != epoch:
            self._waiting = (epoch, now)
            log.info(
                "replica %s: waits for %s to read by member list %d before taking over VINs "
                "from them",
                self.member,
                ", ".join(sorted(behind)),
                epoch,
            )
        if now - self._waiting[1] < wait_s:
            return behind
        if self._gave_up_on == epoch:
            return set()
        self._gave_up_on = epoch
        log.warning(
            "replica %s: %s ha%s not read by member list %d for %.0f s: taking over their VINs "
            "anyway; messages both receive may be written twice",
            self.member,
            ", ".join(sorted(behind)),
            "s" if len(behind) == 1 else "ve",
            epoch,
            now - self._waiting[1],
        )
        return set()

    def _step_envelopes(self, session: FilterSession) -> None:
        """Bring the session's envelope rule to what the group's member lists ask for."""
        epoch = self._runtime.epoch
        members = self._runtime.member_lists.get(epoch)
        if not epoch or members is None:
            return  # no list published yet: the leader publishes one at its first heartbeat
        current = self.rule()
        if current == EnvelopeRule.of(epoch) and self.member in members:
            return  # settled on the list in force: the others' rules cannot change that
        rules = rules_of(self._runtime.call(self._coordinator.subscriptions_starting, RULE_RECORD))
        wanted = next_rule(self.member, current, epoch, members, rules)
        records = self._records()
        stale = sorted(r for r in records if r == self._prefix or r.startswith(RULE_RECORD))
        if wanted is None:
            if stale:
                session.unsubscribe([self._prefix])
                self._runtime.call(self._coordinator.replace_subscribed, self.member, stale, [])
                self._held = records - set(stale)
                log.info("replica %s: no longer takes V2 envelopes", self.member)
            return
        if stale == [wanted.record]:
            return
        if wanted.covers(epoch) and (current is None or not current.covers(epoch)):
            # Taking on the new list: every other session keeping envelopes must claim first.
            others = set(rules) - {self.member}
            if self._behind(others):
                return
        # Until it is recorded, a reconnect that finds no session subscribes the new rule too.
        self._rule_sent = wanted
        try:
            # Replaces the subscription (and its identifier) if the session holds the topic.
            session.subscribe([self._prefix])
            self._runtime.call(
                self._coordinator.replace_subscribed, self.member, stale, [wanted.record]
            )
            self._held = (records - set(stale)) | {wanted.record}
        finally:
            self._rule_sent = None
        log.info(
            "replica %s: takes the V2 envelopes of its VINs by member list(s) %s",
            self.member,
            f"{wanted.lo}..{wanted.hi}" if wanted.lo != wanted.hi else wanted.hi,
        )


def subscribed_vins(coordinator: Coordinator, prefix: str, vins: list[str]) -> set[str]:
    """Which of ``vins`` some session has subscribed (the leader's registration gate)."""
    held = coordinator.subscriptions()
    return {vin for vin in vins if vin_filter(prefix, vin) in held}
