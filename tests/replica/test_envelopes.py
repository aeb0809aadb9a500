"""V2 envelope rules (VIN-sharded mode, MQTT 5): which session keeps which envelope, and the
two-step change of rules that never leaves an envelope to nobody."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.mqtt import Delivery
from ingest.replica.envelopes import (
    MAX_EPOCH,
    EnvelopeOwnership,
    EnvelopeRule,
    envelope_key,
    next_rule,
    rules_of,
    settled,
)
from ingest.replica.shards import APP_TOPIC_KEY, owner
from ingest.testing.traffic import make_vin

PREFIX = "live/level13/app"
LISTS = {1: ["r0", "r1", "r2"], 2: ["r0", "r1", "r2", "r3"]}
VINS = [make_vin(i) for i in range(400)]


def envelope(vin: object) -> bytes:
    return orjson.dumps({"version": 2, "message_id": "m", "vin": vin, "data": {}})


def ownership(member_of: dict[int, str]) -> EnvelopeOwnership:
    return EnvelopeOwnership(
        prefix=PREFIX,
        member_of=member_of.get,
        member_list=LISTS.get,
        max_payload_bytes=1024,
    )


def delivery(rule: EnvelopeRule | None, channel: int = 0) -> Delivery:
    return Delivery(1, 1, 1, channel, rule.identifier if rule is not None else 0)


def test_a_rule_round_trips_through_its_identifier_and_its_record() -> None:
    for rule in (
        EnvelopeRule.of(1),
        EnvelopeRule(3, 9),
        EnvelopeRule(0, 4),
        EnvelopeRule.of(MAX_EPOCH),
    ):
        assert EnvelopeRule.from_identifier(rule.identifier) == rule
        assert EnvelopeRule.from_record(rule.record) == rule
        assert 1 <= rule.identifier < 2**28, "an MQTT 5 Subscription Identifier"
    assert EnvelopeRule.from_record(f"{PREFIX}/VIN/#") is None, "a topic filter is no rule"
    assert EnvelopeRule.from_record("v2-envelopes:x-1") is None
    assert EnvelopeRule.from_identifier(5 << 14 | 2) is None, "lo above hi"
    for lo, hi in ((2, 1), (0, 0), (1, MAX_EPOCH + 1), (-1, 3)):
        with pytest.raises(ValueError, match="not an envelope rule"):
            EnvelopeRule(lo, hi)


def test_the_key_of_an_envelope_is_its_vin_or_the_topic_key() -> None:
    assert envelope_key(envelope("WVW123"), 1024) == "WVW123"
    for unreadable in (b"{not json", envelope(None), envelope(7), envelope("a/b"), b"[1]"):
        assert envelope_key(unreadable, 1024) == APP_TOPIC_KEY, unreadable
    assert envelope_key(envelope("WVW123"), 10) == APP_TOPIC_KEY, "too large: not parsed"


def test_each_member_keeps_the_envelopes_of_the_vins_it_owns() -> None:
    keep = ownership({0: "r1", 5: "r2"}).keep
    rule = EnvelopeRule.of(1)
    for vin in VINS[:50]:
        owned = owner(vin, LISTS[1])
        assert keep(PREFIX, envelope(vin), delivery(rule)) == (owned == "r1")
        assert keep(PREFIX, envelope(vin), delivery(rule, channel=5)) == (owned == "r2")
    # Exactly one member keeps an unreadable envelope: the owner of the topic's own key.
    keepers = {
        member
        for member, channel in (("r1", 0), ("r2", 5))
        if keep(PREFIX, b"{broken", delivery(rule, channel))
    }
    assert keepers == ({owner(APP_TOPIC_KEY, LISTS[1])} & {"r1", "r2"})


def test_a_widened_rule_keeps_what_either_list_gives() -> None:
    keep = ownership({0: "r0"}).keep
    widened = EnvelopeRule(1, 2)
    for vin in VINS[:100]:
        either = "r0" in (owner(vin, LISTS[1]), owner(vin, LISTS[2]))
        assert keep(PREFIX, envelope(vin), delivery(widened)) == either


def test_an_envelope_without_an_identifier_is_kept_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keep = ownership({0: "r0"}).keep
    vin = next(v for v in VINS if owner(v, LISTS[1]) != "r0")
    with caplog.at_level("WARNING", logger="ingest.replica.envelopes"):
        assert keep(PREFIX, envelope(vin), delivery(None))
        assert keep(PREFIX, envelope(vin), delivery(None))
    [warning] = caplog.records
    assert "without a subscription identifier (session of r0)" in warning.getMessage()


def test_in_doubt_a_message_is_kept() -> None:
    keep = ownership({0: "r0"}).keep
    vin = next(v for v in VINS if owner(v, LISTS[1]) != "r0")
    assert not keep(PREFIX, envelope(vin), delivery(EnvelopeRule.of(1)))
    assert keep(f"{PREFIX}/{vin}/x/get/y", b"{}", delivery(EnvelopeRule.of(1))), "not the V2 topic"
    assert keep(PREFIX, envelope(vin), delivery(None)), "no rule on the delivery"
    assert keep(PREFIX, envelope(vin), delivery(EnvelopeRule(0, 1))), "a rule that keeps all"
    assert keep(PREFIX, envelope(vin), delivery(EnvelopeRule.of(1), channel=9)), "whose session?"
    assert keep(PREFIX, envelope(vin), delivery(EnvelopeRule.of(3))), "an epoch never published"


def test_a_rule_narrows_only_once_every_member_of_the_new_list_covers_it() -> None:
    old, new = EnvelopeRule.of(1), LISTS[2]
    rules = {"r0": old, "r1": old, "r2": old}
    assert next_rule("r0", old, 2, new, rules) == EnvelopeRule(1, 2), "widen first"
    rules = {"r0": EnvelopeRule(1, 2), "r1": EnvelopeRule(1, 2), "r2": EnvelopeRule(1, 2)}
    assert not settled(2, new, rules), "r3 has not subscribed yet"
    assert next_rule("r0", EnvelopeRule(1, 2), 2, new, rules) == EnvelopeRule(1, 2)
    assert next_rule("r3", None, 2, new, rules) == EnvelopeRule.of(2), "a new session: the list"
    rules["r3"] = EnvelopeRule.of(2)
    assert next_rule("r0", EnvelopeRule(1, 2), 2, new, rules) == EnvelopeRule.of(2)
    # A member dropped from the list lets the V2 topic go once the list is settled.
    assert next_rule("r9", EnvelopeRule(1, 2), 2, new, rules) is None
    assert next_rule("r9", None, 2, new, rules) is None
    assert rules_of({"v2-envelopes:1-2": {"r0", "r1"}, f"{PREFIX}/X/#": {"r2"}}) == {
        "r0": EnvelopeRule(1, 2),
        "r1": EnvelopeRule(1, 2),
    }


# -- the protocol, as a model: any interleaving of steps, nothing kept by nobody --------------

POOL = ["m0", "m1", "m2", "m3", "m4"]
MODEL_VINS = [make_vin(i) for i in range(120)]


class Group:
    """Sessions whose broker-side rule and recorded rule change in separate steps, as the real
    ones do (SUBSCRIBE, then the record), deciding from a snapshot they read earlier."""

    def __init__(self) -> None:
        self.lists: dict[int, list[str]] = {1: ["m0", "m1", "m2"]}
        self.routing: dict[str, EnvelopeRule | None] = dict.fromkeys(POOL)
        self.recorded: dict[str, EnvelopeRule | None] = dict.fromkeys(POOL)
        for member in self.lists[1]:
            self.routing[member] = self.recorded[member] = EnvelopeRule.of(1)
        self.snapshot: dict[str, tuple[int, dict[str, EnvelopeRule]]] = {}
        self.pending: dict[str, EnvelopeRule | None] = {}

    @property
    def epoch(self) -> int:
        return max(self.lists)

    def publish(self, members: Sequence[str]) -> None:
        self.lists[self.epoch + 1] = list(members)

    def read(self, member: str) -> None:
        rules = {m: r for m, r in self.recorded.items() if r is not None}
        self.snapshot[member] = (self.epoch, rules)

    def subscribe(self, member: str) -> None:
        if member not in self.snapshot:
            return
        epoch, rules = self.snapshot.pop(member)
        wanted = next_rule(member, self.recorded[member], epoch, self.lists[epoch], rules)
        self.routing[member] = self.pending[member] = wanted

    def record(self, member: str) -> None:
        if member in self.pending:
            self.recorded[member] = self.pending.pop(member)

    def keepers(self, vin: str) -> set[str]:
        return {
            member
            for member, rule in self.routing.items()
            if rule is not None
            and any(
                owner(vin, self.lists[e]) == member for e in range(max(rule.lo, 1), rule.hi + 1)
            )
        }


ACTIONS = st.one_of(
    st.tuples(st.just("publish"), st.sets(st.sampled_from(POOL), min_size=1)),
    st.tuples(st.sampled_from(["read", "subscribe", "record"]), st.sampled_from(POOL)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ACTIONS, max_size=60))
def test_no_interleaving_leaves_an_envelope_to_nobody(actions: list[tuple[str, object]]) -> None:
    group = Group()
    for action, argument in actions:
        if action == "publish":
            assert isinstance(argument, set)
            group.publish(sorted(argument))
        else:
            assert isinstance(argument, str)
            getattr(group, action)(argument)
        for vin in MODEL_VINS:
            assert group.keepers(vin), f"{vin} kept by nobody after {action} {argument}"


def test_the_model_can_lose_an_envelope_when_rules_narrow_at_once() -> None:
    """The model catches the failure the two steps prevent: narrowing without waiting."""
    group = Group()
    group.publish(["m0", "m1", "m2", "m3"])
    group.routing["m0"] = group.routing["m1"] = group.routing["m2"] = EnvelopeRule.of(2)
    lost = [vin for vin in MODEL_VINS if not group.keepers(vin)]
    assert lost, "m3 has not subscribed: its VINs of list 2 have no keeper"
