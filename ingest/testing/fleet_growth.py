"""VIN-sharded replicas while the fleet grows: a VIN added to the fleet file mid-stream receives
messages from the moment HM knows it, and none of them is lost.

In vin mode a message published to a VIN topic nobody subscribes to is dropped by the broker, so
the leader may add a VIN at HM only once the VIN's owner has subscribed its topic. HM (here the
emulator) can send data for a VIN as soon as it holds it, so :func:`run_fleet_growth` publishes a
message to each added VIN the moment it shows up at HM (still pending: the ingest gate lets
pending VINs through) and another once it is approved, over a steady stream to the initial fleet,
then accounts for every message in the replicas' output.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ingest.testing.accounting import Tally, tally
from ingest.testing.daemon import APP_ID, wait_for
from ingest.testing.publish import Publisher
from ingest.testing.replicas import (
    FLEET_READY_TIMEOUT_S,
    ReplicaGroup,
    messages_per_replica,
    routing,
)
from ingest.testing.traffic import Message, make_vin, stream, v1_message

# How often HM's side is polled for the added VINs, and the background stream published between.
TICK_S = 0.05
ADDED_TIMEOUT_S = 60.0
_BASE = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)


@dataclass(frozen=True)
class GrowthReport:
    replicas: int
    initial_vins: int
    added_vins: int
    published: int
    added_messages: int  # published to the added VINs (one when HM knew it, one when approved)
    first_known_s: float  # fleet file rewritten → the first added VIN at HM
    all_known_s: float  # → every added VIN at HM
    all_approved_s: float  # → every added VIN approved
    tally: Tally
    spread: dict[str, int]  # every message, per replica that wrote it
    misrouted: int
    # Filters not held by exactly their owner's session at the end (initial and added VINs).
    subscription_problems: int
    misrouted_examples: tuple[str, ...] = ()
    subscription_examples: tuple[str, ...] = ()


@dataclass
class _AddedVins:
    """Which added VINs HM knows and has approved, and when the first / last got there."""

    vins: Sequence[str]
    known: set[str] = field(default_factory=set)
    approved: set[str] = field(default_factory=set)
    first_known_s: float | None = None
    all_known_s: float | None = None
    all_approved_s: float | None = None

    def update(self, statuses: dict[str, str], elapsed_s: float) -> list[str]:
        """Note HM's statuses; the VINs that just became known or approved (one entry each)."""
        fresh = []
        for vin in self.vins:
            status = statuses.get(vin)
            if status is not None and vin not in self.known:
                self.known.add(vin)
                fresh.append(vin)
            if status == "approved" and vin not in self.approved:
                self.approved.add(vin)
                fresh.append(vin)
        if self.known and self.first_known_s is None:
            self.first_known_s = elapsed_s
        if len(self.known) == len(self.vins) and self.all_known_s is None:
            self.all_known_s = elapsed_s
        if len(self.approved) == len(self.vins) and self.all_approved_s is None:
            self.all_approved_s = elapsed_s
        return fresh

    def describe(self) -> str:
        return (
            f"{len(self.known)} of {len(self.vins)} added VINs known at HM, "
            f"{len(self.approved)} approved"
        )


class _Published:
    """Everything published, and the message ids of the added VINs' messages."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self.messages: list[Message] = []
        self._counter = itertools.count()

    def send(self, messages: Sequence[Message]) -> None:
        if messages:
            self._publisher.publish_many([(m.topic, m.payload) for m in messages])
            self.messages.extend(messages)

    def to_added(self, vins: Sequence[str]) -> list[Message]:
        return [self._for(vin) for vin in vins]

    def _for(self, vin: str) -> Message:
        seq = next(self._counter)
        return v1_message(APP_ID, vin, f"added-{seq:09d}", seq, _BASE)


def run_fleet_growth(
    group: ReplicaGroup,
    *,
    vins: int = 1_200,
    added: int = 300,
    rate: float = 600.0,
    progress: Callable[[str], None] = lambda _line: None,
) -> GrowthReport:
    """Start ``group`` (vin mode) on ``vins`` VINs, add ``added`` more while publishing at
    ``rate``, publish to each as soon as HM knows it; account for everything."""
    assert group.mode == "vin", "run_fleet_growth needs a ReplicaGroup with mode='vin'"
    initial = [make_vin(index) for index in range(vins)]
    new = [make_vin(index) for index in range(vins, vins + added)]
    group.fleet_vins = initial
    group.start()
    group.wait_fleet_ready(initial, FLEET_READY_TIMEOUT_S)
    progress(f"{group.count} replicas ready on {vins} VINs; adding {added}")
    background = stream(
        APP_ID, 10**9, vehicles=vins, v2_fraction=group.v2_fraction, seed=13, prefix="b"
    )
    tracker = _AddedVins(new)
    with Publisher(group.broker, group.certs, timeout_s=120) as publisher:
        published = _Published(publisher)
        _publish_for(published, background, rate, seconds=1.0)
        group.add_to_fleet(new)
        _follow_added(group, tracker, published, background, rate)
        # Once more to every added VIN, now that all are settled, with the background going on.
        published.send(published.to_added(new))
        _publish_for(published, background, rate, seconds=1.0)
    progress(f"published {len(published.messages)}; waiting for every message to be committed")
    return _report(group, tracker, published.messages, initial, new)


def _follow_added(
    group: ReplicaGroup,
    tracker: _AddedVins,
    published: _Published,
    background: Iterator[Message],
    rate: float,
) -> None:
    """Poll HM until every added VIN is approved; publish to each one at once when it shows up
    (and when approved), and the background stream in between."""
    assert group.emulator is not None
    added_at = time.monotonic()
    per_tick = max(1, round(rate * TICK_S))
    while tracker.all_approved_s is None:
        tick_started = time.monotonic()
        if tick_started - added_at > ADDED_TIMEOUT_S:
            raise TimeoutError(
                f"timed out after {ADDED_TIMEOUT_S:g} s waiting for the added VINs: "
                f"{tracker.describe()}"
            )
        fresh = tracker.update(group.emulator.statuses(), tick_started - added_at)
        published.send(published.to_added(fresh))
        published.send(list(itertools.islice(background, per_tick)))
        time.sleep(max(0.0, TICK_S - (time.monotonic() - tick_started)))


def _publish_for(
    published: _Published, background: Iterator[Message], rate: float, seconds: float
) -> None:
    per_tick = max(1, round(rate * TICK_S))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tick_started = time.monotonic()
        published.send(list(itertools.islice(background, per_tick)))
        time.sleep(max(0.0, TICK_S - (time.monotonic() - tick_started)))


def _report(
    group: ReplicaGroup,
    tracker: _AddedVins,
    messages: Sequence[Message],
    initial: Sequence[str],
    new: Sequence[str],
) -> GrowthReport:
    ids = [m.message_id for m in messages]
    # On a timeout the tally below reports what is missing.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: tally(group.output, ids).lost == 0, 60, "every message committed")
    problems = group.subscription_problems([*initial, *new])
    group.stop()
    routed = routing(group, messages, None, group.output)
    assert tracker.first_known_s is not None
    assert tracker.all_known_s is not None
    assert tracker.all_approved_s is not None
    return GrowthReport(
        replicas=group.count,
        initial_vins=len(initial),
        added_vins=len(new),
        published=len(messages),
        added_messages=sum(1 for m in messages if m.message_id.startswith("added-")),
        first_known_s=tracker.first_known_s,
        all_known_s=tracker.all_known_s,
        all_approved_s=tracker.all_approved_s,
        tally=tally(group.output, ids),
        spread=dict(messages_per_replica(group.output)),
        misrouted=routed.misrouted,
        subscription_problems=len(problems),
        misrouted_examples=routed.misrouted_examples,
        subscription_examples=tuple(problems[:5]),
    )
