"""VIN-sharded mode: a message of a VIN changing owner is written once, though two sessions get it.

When the member list changes, a VIN's new owner subscribes its topic before the old owner lets it
go (:mod:`ingest.replica.subscriptions`), and under MQTT 5 the V2 envelope rules widen before
they narrow (:mod:`ingest.replica.envelopes`): nothing is ever left without a subscriber, but a
message published in that overlap reaches both sessions. Each would write it. So during a
*handover* both sessions **claim** such a message in the coordination database before logging
it (:meth:`Coordinator.claim`, one transaction per received group): the first claimant logs it,
the other acknowledges it unlogged. The claim key is a hash of topic and payload, identical in
both copies, so nothing needs decoding on the intake thread.

That only works if both copies are claimed. Two rules make sure they are:

* **The old owner claims before the overlap starts.** A session's intake claims every message of
  a VIN whose owner differs between two consecutive member lists (a *moving* VIN) from the moment
  its replica has read the newer list, and records that it has (:meth:`Coordinator.record_known`).
  A new owner subscribes a VIN's topic that another session holds, or widens its envelope rule to
  a new list, only once every such session has recorded the list: every message routed to both
  arrives at the old owner after it started claiming.
* **Claiming lasts past the overlap.** Whether a message is claimed is decided when it is read,
  which may be long after it was routed (a session working through a backlog). The leader
  records when the group *settled* after a list: no topic held by two sessions, every VIN topic
  held by its owner under the newest list, every envelope rule narrowed to it
  (:func:`overlapping`). Sessions go on claiming a list's moving VINs for ``window_s`` after that
  (``[replica] handover_window_s``), so a copy read up to that long after the overlap ended is
  still matched against the other's claim. A session further behind than that may write a moved
  VIN's message twice; the window is the bound, and it is a setting.

A claim is durable before the message is logged and acknowledged: a session that claims and
crashes gets the message again from its broker session (or its host does, for the same member)
and finds its own claim. The database being unreachable keeps the message (a duplicate can be
removed when reading; a lost message cannot be had back). Claims are deleted once every list's
window has closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ingest.batch import content_digest
from ingest.errors import IngestError
from ingest.metrics import Metrics
from ingest.mqtt import Delivery
from ingest.replica.envelopes import EnvelopeOwnership, EnvelopeRule, envelope_key
from ingest.replica.shards import APP_TOPIC_KEY, owner, unit_of

log = logging.getLogger("ingest.replica.handover")

# One received message as intake hands it over: (topic, payload, delivery).
Received = tuple[str, bytes, Delivery]
# Claim these keys for a member: each key's claimant (Coordinator.claim).
Claim = Callable[[str, Sequence[str]], Mapping[str, str]]
# A failed claim is logged at most this often (every group would fail while the database is away).
CLAIM_ERROR_LOG_INTERVAL_S = 60.0


def open_epochs(
    lists: Mapping[int, Sequence[str]],
    settled_at: Mapping[int, float],
    now: float,
    window_s: float,
) -> list[int]:
    """The member lists whose moving VINs are claimed now: each list after the first, from its
    publication until ``window_s`` after the group settled on it (or a later list)."""
    return [
        epoch
        for epoch in sorted(lists)
        if epoch - 1 in lists and (epoch not in settled_at or now < settled_at[epoch] + window_s)
    ]


def moving(key: str, epochs: Sequence[int], lists: Mapping[int, Sequence[str]]) -> bool:
    """Whether ``key``'s owner differs between any open list and the one before it."""
    return any(owner(key, lists[epoch - 1]) != owner(key, lists[epoch]) for epoch in epochs)


def overlapping(
    subscriptions: Mapping[str, set[str]],
    *,
    prefix: str,
    members: Sequence[str],
    epoch: int,
    envelopes: bool,
) -> str | None:
    """Why the group is not settled on list ``epoch`` (``members``), or None when it is.

    ``subscriptions``: every recorded topic filter or envelope rule and the sessions holding it
    (:meth:`Coordinator.subscriptions`). Settled: no filter held by two sessions, each held by
    its owner under ``members``, every envelope rule narrowed to ``epoch`` (``envelopes``: the
    sessions take the V2 topic under envelope rules, MQTT 5).
    """
    settled_rule = EnvelopeRule.of(epoch)
    for record, holders in subscriptions.items():
        rule = EnvelopeRule.from_record(record)
        if rule is not None:
            if rule != settled_rule:
                sessions = ", ".join(sorted(holders))
                return f"{sessions} keep V2 envelopes by lists {rule.lo}..{rule.hi}"
            continue
        if envelopes and record == prefix:
            return f"{', '.join(sorted(holders))} hold the V2 topic without an envelope rule"
        if len(holders) > 1:
            return f"{record} is subscribed by {', '.join(sorted(holders))}"
        (holder,) = holders
        if owner(unit_of(prefix, record), members) != holder:
            return f"{record} is still subscribed by {holder}, not its owner"
    return None


@dataclass
class MessageOwnership:
    """Intake's question for each received group: which of these messages does this daemon log?

    A V2 envelope another session keeps by its rule (``envelopes``) is not this daemon's; a
    message of a moving VIN is if this session's member wins its claim. Runs on the intake
    thread; ``member_lists`` and ``settled_at`` read the replica runtime's latest view.
    """

    prefix: str
    member_of: Callable[[int], str | None]
    member_lists: Callable[[], Mapping[int, Sequence[str]]]
    settled_at: Callable[[], Mapping[int, float]]
    claim: Claim
    window_s: float
    metrics: Metrics
    envelopes: EnvelopeOwnership | None = None
    max_payload_bytes: int = 0
    clock: Callable[[], float] = time.time
    _error_logged_at: float | None = field(default=None, init=False)

    def keep(self, group: Sequence[Received]) -> list[bool]:
        kept = [True] * len(group)
        if self.envelopes is not None:
            for index, (topic, payload, delivery) in enumerate(group):
                kept[index] = self.envelopes.keep(topic, payload, delivery)
            skipped = kept.count(False)
            if skipped:
                self.metrics.envelopes_skipped.inc(skipped)
        lists = self.member_lists()
        epochs = open_epochs(lists, self.settled_at(), self.clock(), self.window_s)
        if not epochs:
            return kept
        to_claim: dict[str, list[tuple[int, str]]] = {}
        for index, (topic, payload, delivery) in enumerate(group):
            if not kept[index]:
                continue
            key = self._unit(topic, payload)
            if key is None or not moving(key, epochs, lists):
                continue
            member = self.member_of(delivery.channel)
            if member is not None:  # a session being let go: kept, as in every doubt
                to_claim.setdefault(member, []).append((index, content_digest(topic, payload)))
        for member, claims in to_claim.items():
            self._settle_claims(member, claims, kept)
        return kept

    def _unit(self, topic: str, payload: bytes) -> str | None:
        """The ownership key of a message: its VIN, or the V2 topic's; None for another topic."""
        if topic == self.prefix:
            if self.envelopes is None:
                return APP_TOPIC_KEY
            return envelope_key(payload, self.max_payload_bytes)
        if not topic.startswith(self.prefix + "/"):
            return None
        return topic[len(self.prefix) + 1 :].partition("/")[0]

    def _settle_claims(self, member: str, claims: list[tuple[int, str]], kept: list[bool]) -> None:
        try:
            claimants = self.claim(member, [key for _, key in claims])
        except IngestError as exc:
            self.metrics.handover_claims.labels("unavailable").inc(len(claims))
            now = time.monotonic()
            if self._error_logged_at is None or now - self._error_logged_at >= (
                CLAIM_ERROR_LOG_INTERVAL_S
            ):
                self._error_logged_at = now
                log.warning(
                    "cannot claim %d message(s) of VINs changing owner (%s): logged, so another "
                    "replica may write them too (logged at most once a minute)",
                    len(claims),
                    exc,
                )
            return
        lost = 0
        for index, key in claims:
            if claimants.get(key, member) != member:
                kept[index] = False
                lost += 1
        if lost:
            self.metrics.handover_claims.labels("other").inc(lost)
        if len(claims) > lost:
            self.metrics.handover_claims.labels("own").inc(len(claims) - lost)
