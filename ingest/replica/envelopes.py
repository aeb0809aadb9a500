"""V2 envelopes in VIN-sharded mode: every session takes the V2 topic, each keeps its VINs' share.

V2 envelopes arrive on one topic per application, with the VIN inside the payload, so no topic
filter can split them by VIN. With MQTT 5 every replica's session (and every session the leader
hosts) subscribes the V2 topic, and each keeps the envelopes whose VIN its member owns by the
same rendezvous hash as the per-VIN topics (:mod:`ingest.replica.shards`). The others are
acknowledged without being logged: their owner's session has its own copy. An envelope whose VIN
cannot be read goes to the owner of the topic's own key, which quarantines it, so it is kept once.

The hard part is a change of the member list. Replicas learn the group's new list at different
heartbeats, and a session decides on a message when it reads it, which may be long after its
publication (a backlog): judged by the reader's list of the moment, an envelope could be
dropped by its old owner (already on the new list) and by its new owner (still on the old one).
So the decision is not taken by the list of the moment but by a **rule fixed at routing time**:
each session subscribes the V2 topic with an MQTT 5 Subscription Identifier that names its rule,
and the broker stamps every message it routes to that session with it. A rule is a range of
member-list *epochs* (the leader numbers each list it publishes): keep an envelope when its VIN's
owner under any list in the range is the session's member.

A session's rule moves in two steps, like the per-VIN filters' subscribe-before-unsubscribe:

1. on a new epoch E it widens its rule to include E (old lists and the new one);
2. it narrows to E alone only once every member of list E holds a rule that includes E
   (:func:`settled`, read from the rules each session recorded after its SUBACK).

So at every moment of routing some list is in every needed session's rule (the old one until all
have widened, then the new one), and that list's owner keeps the envelope: nothing is dropped by
all. Sessions that disagree for a moment both keep it, and claim it before logging it, as a
per-VIN message in a filter's overlap (:mod:`ingest.replica.handover`): one of them writes it.
A rule that starts at epoch 0 keeps every envelope; it stands for a session that held the V2
topic before rules existed (the single owner of the topic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from ingest.mqtt import Delivery
from ingest.replica.shards import APP_TOPIC_KEY, owner, usable_vin

log = logging.getLogger("ingest.replica.envelopes")

# An identifier holds two epochs: 28 bits, the most an MQTT 5 Subscription Identifier allows.
EPOCH_BITS = 14
MAX_EPOCH = (1 << EPOCH_BITS) - 1
# How a session's rule is recorded beside its topic filters in the coordination database: a
# string no topic filter of ours can be (they start with the topic prefix, "live/...").
RULE_RECORD = "v2-envelopes:"


@dataclass(frozen=True, slots=True)
class EnvelopeRule:
    """Keep an envelope when its VIN's owner under any member list in epochs ``lo``..``hi`` is
    the session's member; ``lo`` 0 keeps every envelope."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi <= MAX_EPOCH or self.hi == 0:
            raise ValueError(f"not an envelope rule: epochs {self.lo}..{self.hi}")

    @classmethod
    def of(cls, epoch: int) -> EnvelopeRule:
        return cls(epoch, epoch)

    @property
    def identifier(self) -> int:
        """The Subscription Identifier naming this rule (1 to 2^28 - 1)."""
        return self.lo << EPOCH_BITS | self.hi

    @classmethod
    def from_identifier(cls, identifier: int) -> EnvelopeRule | None:
        try:
            return cls(identifier >> EPOCH_BITS, identifier & MAX_EPOCH)
        except ValueError:
            return None

    @property
    def record(self) -> str:
        return f"{RULE_RECORD}{self.lo}-{self.hi}"

    @classmethod
    def from_record(cls, text: str) -> EnvelopeRule | None:
        """The rule a coordination record names, None when ``text`` is a topic filter."""
        if not text.startswith(RULE_RECORD):
            return None
        lo, _, hi = text.removeprefix(RULE_RECORD).partition("-")
        try:
            return cls(int(lo), int(hi))
        except ValueError:
            return None

    @property
    def keeps_all(self) -> bool:
        return self.lo == 0

    def covers(self, epoch: int) -> bool:
        return self.lo <= epoch <= self.hi

    def widened(self, epoch: int) -> EnvelopeRule:
        return EnvelopeRule(min(self.lo, epoch), max(self.hi, epoch))


def uncovered(epoch: int, members: Sequence[str], rules: Mapping[str, EnvelopeRule]) -> list[str]:
    """The members of list ``epoch`` whose session holds no rule covering it yet."""
    return [m for m in members if m not in rules or not rules[m].covers(epoch)]


def settled(epoch: int, members: Sequence[str], rules: Mapping[str, EnvelopeRule]) -> bool:
    """Whether every member of list ``epoch`` holds a rule covering it: sessions may narrow."""
    return not uncovered(epoch, members, rules)


def next_rule(
    member: str,
    current: EnvelopeRule | None,
    epoch: int,
    members: Sequence[str],
    rules: Mapping[str, EnvelopeRule],
) -> EnvelopeRule | None:
    """The rule ``member``'s session should hold now, None for no V2 subscription.

    ``current``: the rule it holds; ``epoch``/``members``: the group's list in force; ``rules``:
    every session's recorded rule. Widen first; narrow only once the list is settled.
    """
    if current is None or settled(epoch, members, rules):
        if member not in members:
            return None  # in no list still needed: it owns no VIN, and takes no envelope
        return EnvelopeRule.of(epoch)
    return current.widened(epoch)


def rules_of(subscriptions: Mapping[str, set[str]]) -> dict[str, EnvelopeRule]:
    """Each session's recorded envelope rule, from :meth:`Coordinator.subscriptions`."""
    rules: dict[str, EnvelopeRule] = {}
    for record, holders in subscriptions.items():
        rule = EnvelopeRule.from_record(record)
        if rule is not None:
            for holder in holders:
                rules[holder] = rule
    return rules


def envelope_key(payload: bytes, max_payload_bytes: int) -> str:
    """The ownership key of a V2 envelope: its VIN, or APP_TOPIC_KEY when none can be read."""
    if len(payload) > max_payload_bytes:
        return APP_TOPIC_KEY  # the sink quarantines it as too large; no need to parse it here
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return APP_TOPIC_KEY
    vin = body.get("vin") if isinstance(body, dict) else None
    return vin if isinstance(vin, str) and usable_vin(vin) else APP_TOPIC_KEY


class EnvelopeOwnership:
    """Intake's question for each message: is it this session's to log? (intake thread)."""

    def __init__(
        self,
        *,
        prefix: str,
        member_of: Callable[[int], str | None],
        member_list: Callable[[int], Sequence[str] | None],
        max_payload_bytes: int,
    ) -> None:
        """``member_of(channel)``: whose session a delivery came from (None: unknown);
        ``member_list(epoch)``: the group's member list of that epoch (None: unknown)."""
        self._prefix = prefix
        self._member_of = member_of
        self._member_list = member_list
        self._max_payload_bytes = max_payload_bytes
        self._warned_unstamped = False

    def _warn_unstamped(self, delivery: Delivery) -> None:
        if self._warned_unstamped:
            return
        self._warned_unstamped = True
        log.warning(
            "a V2 envelope arrived without a subscription identifier (session of %s): it is "
            "kept, as is every such envelope, so other replicas may write it too. Expected for "
            "envelopes queued before this group used envelope rules; if it goes on, the broker "
            "does not stamp identifiers: set [mqtt] protocol = '3.1.1' (logged once)",
            self._member_of(delivery.channel) or f"channel {delivery.channel}",
        )

    def keep(self, topic: str, payload: bytes, delivery: Delivery) -> bool:
        """False only for a V2 envelope another member's session keeps by this rule.

        In doubt (no rule on the delivery, an unknown channel or epoch) it keeps the message:
        a duplicate can be removed when reading, a dropped message cannot be had back.
        """
        if topic != self._prefix:
            return True
        if not delivery.subscription:
            self._warn_unstamped(delivery)
            return True
        rule = EnvelopeRule.from_identifier(delivery.subscription)
        member = self._member_of(delivery.channel)
        if rule is None or rule.keeps_all or member is None:
            return True
        key = envelope_key(payload, self._max_payload_bytes)
        for epoch in range(rule.lo, rule.hi + 1):
            members = self._member_list(epoch)
            if not members:
                return True
            if owner(key, members) == member:
                return True
        return False
