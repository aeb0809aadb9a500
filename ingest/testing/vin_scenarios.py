"""VIN-sharded replicas through two operator events, under a steady stream, accounted exactly.

Both scenarios run real ``hm-ingest run`` replicas (:class:`~ingest.testing.replicas.ReplicaGroup`
with ``mode="vin"``), a real Mosquitto and the HM emulator, publish a paced stream across
thousands of VINs on a thread of their own from before the first event to after the last, and
account for every published message in the Parquet output (:func:`ingest.testing.accounting.tally`):

* :func:`run_host_shutdown`, a rolling restart of the leader while it hosts a lost follower: r1 is
  SIGKILLed; once r0 (the leader) hosts r1's session, r0 gets SIGTERM. It must hand r1's session
  back to the broker cleanly and exit 0; r2 becomes leader and hosts r1's session, then r0's once
  r0's lease runs out; r0 and r1 are restarted and take their sessions back.
* :func:`run_resize`, 3 → 4 members: r0, r1 and r2 are restarted one at a time with the member list
  [r0, r1, r2, r3] (so for a while the replicas disagree on the list), and r3 starts with it,
  after the rolling restart or before it. Every VIN must end up subscribed by its new owner only.
  A moved VIN's messages published while both its old and its new owner subscribe it are written
  twice (docs/scaling.md); the report measures them, says which replicas wrote them and in which
  phase they were published, and snapshots who held the moved VINs' filters in each mixed state.
* :func:`run_shrink`, 4 → 3 members: r3 stops for good, then r0, r1 and r2 are restarted one at a
  time with [r0, r1, r2]. The leader hosts r3's session until every VIN r3 owned has its new
  owner's subscription, then drains it and deletes it; the same accounting as the resize.

Each event opens a *phase*; every message is filed under the phase it was published in, so a loss
or a duplicate points at the event it happened around.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ingest.replica.shards import APP_TOPIC_KEY, owner, vin_filter
from ingest.testing.accounting import Tally, tally
from ingest.testing.daemon import APP_ID, DaemonProcess, wait_for, wait_ready
from ingest.testing.daemon import write_toml as write_settings
from ingest.testing.publish import Publisher
from ingest.testing.replicas import (
    FLEET_READY_TIMEOUT_S,
    HOSTING_LINE,
    RELEASED_LINE,
    ReplicaGroup,
    writers,
)
from ingest.testing.traffic import Message, make_vin, stream

# The stream is published in slices this often; a gap much longer means the publisher stalled.
SLICE_S = 0.05
# Steady traffic before the first event and after the last, so both edges are covered.
LEAD_IN_S = 2.0
LEAD_OUT_S = 2.0
# How long a replica may take to log that it hosts or released a session, to exit, to settle.
EVENT_TIMEOUT_S = 45.0
EXIT_TIMEOUT_S = 60.0
COMMIT_TIMEOUT_S = 90.0
# A replica's shutdown logs this when it could not hand a hosted session back cleanly.
NOT_HANDED_BACK_LINE = "session not handed back cleanly"


# -- the stream -----------------------------------------------------------------------------------


class PacedStream:
    """Publishes ``rate`` messages a second across ``vins`` VINs on its own thread, from
    :meth:`start` to :meth:`stop`, remembering when each slice was acknowledged by the broker."""

    def __init__(self, group: ReplicaGroup, *, vins: int, rate: float, seed: int) -> None:
        self._group = group
        self._rate = rate
        self._messages = stream(
            APP_ID, 10**9, vehicles=vins, v2_fraction=group.v2_fraction, seed=seed, prefix="s"
        )
        # (monotonic time the broker acknowledged the slice, the slice)
        self.slices: list[tuple[float, list[Message]]] = []
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="paced-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[Message]:
        """Stop publishing; every message published. Re-raises what stopped the thread early."""
        self._stop.set()
        self._thread.join(60)
        if self._failure is not None:
            raise RuntimeError(f"the paced stream failed: {self._failure}") from self._failure
        return [m for _, part in self.slices for m in part]

    @property
    def largest_gap_s(self) -> float:
        """The longest time between two acknowledged slices (the stream never paused longer)."""
        times = [at for at, _ in self.slices]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def _run(self) -> None:
        per_slice = max(1, round(self._rate * SLICE_S))
        try:
            with Publisher(self._group.broker, self._group.certs, timeout_s=60) as publisher:
                while not self._stop.is_set():
                    started = time.monotonic()
                    part = list(itertools.islice(self._messages, per_slice))
                    publisher.publish_many([(m.topic, m.payload) for m in part])
                    self.slices.append((time.monotonic(), part))
                    self._stop.wait(max(0.0, SLICE_S - (time.monotonic() - started)))
        except BaseException as exc:  # reported by stop(), on the test's thread
            self._failure = exc


@dataclass(frozen=True)
class PhaseFigures:
    """What happened to the messages published during one phase."""

    name: str
    seconds: float
    published: int
    lost: int
    duplicated: int  # messages written by more than one replica


@dataclass
class Phases:
    """Named phases, each from its start to the next one's (the last to the end of the run)."""

    starts: list[tuple[str, float]] = field(default_factory=list)

    def begin(self, name: str) -> None:
        self.starts.append((name, time.monotonic()))

    def name_at(self, moment: float) -> str:
        current = self.starts[0][0]
        for name, started in self.starts:
            if started > moment:
                break
            current = name
        return current

    def figures(
        self, slices: Sequence[tuple[float, list[Message]]], written: dict[str, set[str]]
    ) -> list[PhaseFigures]:
        """Per phase: published, lost and written twice, from ``writers()``' answer."""
        published: Counter[str] = Counter()
        lost: Counter[str] = Counter()
        doubled: Counter[str] = Counter()
        last_at = slices[-1][0] if slices else time.monotonic()
        for at, part in slices:
            name = self.name_at(at)
            for message in part:
                published[name] += 1
                count = len(written.get(message.message_id, ()))
                lost[name] += count == 0
                doubled[name] += count > 1
        ends = [started for _, started in self.starts[1:]] + [last_at]
        return [
            PhaseFigures(name, end - started, published[name], lost[name], doubled[name])
            for (name, started), end in zip(self.starts, ends, strict=True)
        ]


def describe_phases(figures: Iterable[PhaseFigures]) -> str:
    return "\n".join(
        f"  {f.name:<44} {f.seconds:5.1f} s  published {f.published:6}  lost {f.lost}  "
        f"written twice {f.duplicated}"
        for f in figures
    )


# -- log lines ------------------------------------------------------------------------------------


class LineWatch:
    """Notes when ``line`` first appears once more in ``process``'s log than when created."""

    def __init__(self, process: DaemonProcess, line: str) -> None:
        self.line = line
        self._process = process
        self._already = process.log_text().count(line)
        self._seen_at: float | None = None
        self._done = threading.Event()
        threading.Thread(target=self._poll, name="line-watch", daemon=True).start()

    def _poll(self) -> None:
        while not self._done.is_set():
            if self._process.log_text().count(self.line) > self._already:
                self._seen_at = time.monotonic()
                self._done.set()
                return
            self._done.wait(0.05)

    def wait(self, timeout_s: float = EVENT_TIMEOUT_S) -> float:
        """The monotonic time the line appeared; TimeoutError naming it and the log."""
        if not self._done.wait(timeout_s) or self._seen_at is None:
            self._done.set()
            raise TimeoutError(
                f"timed out after {timeout_s:g} s waiting for {self.line!r} in "
                f"{self._process.log_path.name}"
            )
        return self._seen_at


def _hosting(group: ReplicaGroup, host: str, member: str) -> LineWatch:
    process = group.processes[group.index_of(host)]
    return LineWatch(process, HOSTING_LINE.format(replica=member))


def _released(group: ReplicaGroup, host: str, member: str) -> LineWatch:
    process = group.processes[group.index_of(host)]
    return LineWatch(process, RELEASED_LINE.format(replica=member))


# -- shared steps ---------------------------------------------------------------------------------


def _start_fleet(group: ReplicaGroup, vins: int) -> float:
    """Start the group with ``vins`` VINs in the fleet file; seconds until all are approved at HM
    and subscribed by their owners (a message to a topic nobody subscribes is dropped)."""
    assert group.mode == "vin", "these scenarios need a ReplicaGroup with mode='vin'"
    group.fleet_vins = [make_vin(index) for index in range(vins)]
    started = time.monotonic()
    group.start()
    group.wait_fleet_ready(group.fleet_vins, FLEET_READY_TIMEOUT_S)
    return time.monotonic() - started


def _stop_process(process: DaemonProcess) -> int:
    process.signal(signal.SIGTERM)
    return process.wait(EXIT_TIMEOUT_S)


def _wait_committed(group: ReplicaGroup, messages: Sequence[Message]) -> Tally:
    ids = [m.message_id for m in messages]
    # On a timeout the tally reports what is missing.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: tally(group.output, ids).lost == 0, COMMIT_TIMEOUT_S, "every message")
    return tally(group.output, ids)


def _settled(group: ReplicaGroup) -> Callable[[], bool]:
    return lambda: not group.hosted_sessions() and not group.subscription_problems(group.fleet_vins)


# -- scenario 1: the leader shuts down while it hosts a lost follower -----------------------------


@dataclass(frozen=True)
class HostShutdownReport:
    vins: int
    published: int
    fleet_ready_s: float
    kill_to_r0_hosting_r1_s: float
    # SIGTERM of r0 → r2 logs that it hosts r1's session (r0 handed it back and resigned first)
    term_to_r2_hosting_r1_s: float
    term_to_r0_exit_s: float
    term_to_r2_hosting_r0_s: float  # r0's lease runs out, then r2 hosts its session too
    r0_exit_code: int
    leader_after_term: str | None
    restart_to_released_s: dict[str, float]  # r0, r1: restart → r2 logged the release
    not_handed_back: tuple[str, ...]  # r0's log lines saying a session was not handed back
    still_hosted: dict[str, str]
    subscription_problems: tuple[str, ...]
    exit_codes: list[int]  # r0, r1, r2 at the end (SIGTERM)
    largest_gap_s: float
    tally: Tally
    phases: tuple[PhaseFigures, ...]


def run_host_shutdown(
    group: ReplicaGroup,
    *,
    vins: int = 2_000,
    rate: float = 500.0,
    progress: Callable[[str], None] = lambda _line: None,
) -> HostShutdownReport:
    """The rolling restart of a leader that hosts a lost follower; see the module docstring."""
    fleet_ready_s = _start_fleet(group, vins)
    progress(
        f"3 replicas ready on {vins} VINs after {fleet_ready_s:.1f} s; leader {group.leader()}"
    )
    r0, r1 = group.processes[0], group.processes[1]
    paced = PacedStream(group, vins=vins, rate=rate, seed=21)
    phases = Phases()
    phases.begin("steady")
    paced.start()
    try:
        time.sleep(LEAD_IN_S)
        r0_hosts_r1 = _hosting(group, "r0", "r1")
        phases.begin("r1 SIGKILLed, until r0 hosts it")
        r1.kill()
        killed_at = time.monotonic()
        hosted_at = r0_hosts_r1.wait()
        phases.begin("r0 hosts r1")
        time.sleep(1.0)  # r0 takes some of r1's messages into its pipeline before it stops
        r2_hosts_r1, r2_hosts_r0 = _hosting(group, "r2", "r1"), _hosting(group, "r2", "r0")
        phases.begin("r0 SIGTERMed, until r2 hosts r1")
        r0.signal(signal.SIGTERM)
        term_at = time.monotonic()
        r2_hosted_r1_at = r2_hosts_r1.wait()
        phases.begin("r2 hosts r1, until it hosts r0")
        r0_exit_code = r0.wait(EXIT_TIMEOUT_S)
        r0_exited_at = time.monotonic()
        leader_after_term = group.leader()
        r2_hosted_r0_at = r2_hosts_r0.wait()
        phases.begin("r2 hosts r0 and r1")
        time.sleep(1.0)
        released = {name: _released(group, "r2", name) for name in ("r0", "r1")}
        phases.begin("r0, r1 restarted, until released")
        restarted_at = time.monotonic()
        r0.start()
        r1.start()
        released_at = {name: watch.wait() for name, watch in released.items()}
        for index in (0, 1):
            wait_ready(group.trees[index], timeout_s=EVENT_TIMEOUT_S)
        phases.begin("all back")
        wait_for(_settled(group), EVENT_TIMEOUT_S, "every session with its replica")
        time.sleep(LEAD_OUT_S)
    finally:
        messages = paced.stop()
    progress(f"published {len(messages)}; waiting for every message to be committed")
    result = _wait_committed(group, messages)
    problems = group.subscription_problems(group.fleet_vins)
    still_hosted = group.hosted_sessions()
    exit_codes = group.stop()
    return HostShutdownReport(
        vins=vins,
        published=len(messages),
        fleet_ready_s=fleet_ready_s,
        kill_to_r0_hosting_r1_s=hosted_at - killed_at,
        term_to_r2_hosting_r1_s=r2_hosted_r1_at - term_at,
        term_to_r0_exit_s=r0_exited_at - term_at,
        term_to_r2_hosting_r0_s=r2_hosted_r0_at - term_at,
        r0_exit_code=r0_exit_code,
        leader_after_term=leader_after_term,
        restart_to_released_s={n: at - restarted_at for n, at in released_at.items()},
        not_handed_back=tuple(
            line for line in r0.log_text().splitlines() if NOT_HANDED_BACK_LINE in line
        ),
        still_hosted=still_hosted,
        subscription_problems=tuple(problems[:5]),
        exit_codes=exit_codes,
        largest_gap_s=paced.largest_gap_s,
        tally=result,
        phases=tuple(phases.figures(paced.slices, writers(group.output))),
    )


# -- scenario 2: 3 → 4 members --------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriptionSnapshot:
    """Who held the moved units' filters at one moment, and who led and hosted."""

    phase: str
    holders: dict[str, int]  # "r0+r3" → moved filters held by exactly those sessions ("none")
    leader: str | None
    hosted: dict[str, str]

    def describe(self) -> str:
        return (
            f"  {self.phase:<44} moved filters by holders {self.holders}; "
            f"leader {self.leader}; hosted {self.hosted}"
        )


@dataclass(frozen=True)
class ResizeReport:
    vins: int
    published: int
    fleet_ready_s: float
    moved_units: int  # VINs (and the V2 topic) whose owner changed 3 → 4
    ready_s: dict[str, float]  # r0..r2: SIGTERM → ready with the new list; r3: start → ready
    exit_codes: dict[str, int]  # of those SIGTERMs
    settle_s: float  # the last replica ready → every filter with its owner only, nothing hosted
    # Messages of moved units published between the first SIGTERM and the end state: the most
    # that can have been published while such a unit had two subscribers.
    moved_messages_in_transition: int
    duplicated: int  # messages written by two replicas (tally's count of extra copies)
    duplicated_moved: int  # of which messages of a moved unit
    duplicated_by_writers: dict[str, int]  # "r1+r3" → messages written by exactly those
    snapshots: tuple[SubscriptionSnapshot, ...]
    subscription_problems: tuple[str, ...]
    still_hosted: dict[str, str]
    final_exit_codes: list[int]
    largest_gap_s: float
    tally: Tally
    phases: tuple[PhaseFigures, ...]


def run_resize(
    group: ReplicaGroup,
    *,
    vins: int = 2_000,
    rate: float = 500.0,
    hold_s: float = 2.0,
    new_member_first: bool = False,
    progress: Callable[[str], None] = lambda _line: None,
) -> ResizeReport:
    """Grow ``group`` from 3 to 4 members under a stream; see the module docstring.

    ``hold_s``: how long each mixed state (replicas disagreeing on the list) lasts after a
    replica is ready, before the next event. ``new_member_first``: r3 starts before the rolling
    restart (what a StatefulSet scale-up with a changed member list does) instead of after it.
    """
    fleet_ready_s = _start_fleet(group, vins)
    old_members = list(group.members)
    new_members = [*old_members, group.replica_id(len(old_members))]
    run = _Resize(
        fleet_ready_s,
        _moved_units(group, old_members, new_members),
        PacedStream(group, vins=vins, rate=rate, seed=23),
    )
    progress(f"3 replicas ready after {fleet_ready_s:.1f} s; {len(run.moved)} units move to r3")
    order = list(range(len(new_members)))
    if new_member_first:
        order = order[-1:] + order[:-1]
    run.phases.begin("steady, members [r0 r1 r2]")
    run.paced.start()
    try:
        time.sleep(LEAD_IN_S)
        run.started = time.monotonic()
        for index in order:
            name = group.replica_id(index)
            if index == len(old_members):
                run.phases.begin(f"{name} starting")
                started = time.monotonic()
                group.add_replica(ready_timeout_s=EVENT_TIMEOUT_S)
                run.ready_s[name] = time.monotonic() - started
            else:
                run.restart(group, index, new_members)
            run.hold(group, f"{name} ready: {_lists(group, new_members)}", hold_s)
        run.settle(group)
    finally:
        messages = run.paced.stop()
    return run.report(group, messages, progress)


def run_shrink(
    group: ReplicaGroup,
    *,
    vins: int = 2_000,
    rate: float = 500.0,
    hold_s: float = 2.0,
    progress: Callable[[str], None] = lambda _line: None,
) -> ResizeReport:
    """Shrink ``group`` (started with 4 members) to 3 under a stream: r3 stops for good (SIGTERM,
    as a StatefulSet scale-down does), then r0, r1 and r2 are restarted one at a time with the
    list [r0, r1, r2]. r3's session is hosted by the leader until every VIN it owned has its new
    owner's subscription, then drained and deleted; nothing may be lost."""
    assert group.count == 4, "run_shrink starts from four members"
    fleet_ready_s = _start_fleet(group, vins)
    old_members = list(group.members)
    new_members = old_members[:-1]
    run = _Resize(
        fleet_ready_s,
        _moved_units(group, old_members, new_members),
        PacedStream(group, vins=vins, rate=rate, seed=29),
    )
    leaving = group.replica_id(len(new_members))
    progress(f"4 replicas ready after {fleet_ready_s:.1f} s; {len(run.moved)} units leave r3")
    run.phases.begin("steady, members [r0 r1 r2 r3]")
    run.paced.start()
    try:
        time.sleep(LEAD_IN_S)
        run.started = time.monotonic()
        run.phases.begin(f"{leaving} stopping for good")
        run.exit_codes[leaving] = _stop_process(group.processes[len(new_members)])
        run.hold(group, f"{leaving} stopped", hold_s)
        for index in range(len(new_members)):
            run.restart(group, index, new_members)
            run.hold(
                group, f"{group.replica_id(index)} ready: {_lists(group, new_members)}", hold_s
            )
        group.count = len(new_members)  # the group's members (and owners) from now on
        run.settle(group)
    finally:
        messages = run.paced.stop()
    return run.report(group, messages, progress)


@dataclass
class _Resize:
    """One change of the member list under a stream, and what it measured."""

    fleet_ready_s: float
    moved: set[str]
    paced: PacedStream
    phases: Phases = field(default_factory=Phases)
    snapshots: list[SubscriptionSnapshot] = field(default_factory=list)
    # SIGTERM → ready again with the new list (a new member: start → ready), the exit codes
    ready_s: dict[str, float] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    started: float = 0.0  # the first event
    last_ready_at: float = 0.0
    ended: float = 0.0  # the end state: every VIN with its new owner only, nothing hosted

    def restart(self, group: ReplicaGroup, index: int, members: Sequence[str]) -> None:
        name = group.replica_id(index)
        self.phases.begin(f"{name} restarting")
        started = time.monotonic()
        self.exit_codes[name] = _restart_with_members(group, index, members)
        self.ready_s[name] = time.monotonic() - started

    def hold(self, group: ReplicaGroup, phase: str, hold_s: float) -> None:
        """Open ``phase`` (a mixed state), let it last ``hold_s``, snapshot the subscriptions."""
        self.phases.begin(phase)
        self.last_ready_at = time.monotonic()
        time.sleep(hold_s)
        self.snapshots.append(_snapshot(group, self.moved, phase))

    def settle(self, group: ReplicaGroup) -> None:
        """Wait for the end state, then a lead-out of the stream."""
        wait_for(_settled(group), EVENT_TIMEOUT_S, "every VIN subscribed by its new owner only")
        self.ended = time.monotonic()
        self.snapshots.append(_snapshot(group, self.moved, "settled"))
        self.phases.begin("settled")
        time.sleep(LEAD_OUT_S)

    def report(
        self, group: ReplicaGroup, messages: list[Message], progress: Callable[[str], None]
    ) -> ResizeReport:
        progress(f"published {len(messages)}; waiting for every message to be committed")
        result = _wait_committed(group, messages)
        problems = group.subscription_problems(group.fleet_vins)
        still_hosted = group.hosted_sessions()
        final_exit_codes = group.stop()
        written = writers(group.output)
        doubled = [m for m in messages if len(written.get(m.message_id, ())) > 1]
        moved = self.moved
        return ResizeReport(
            vins=len(group.fleet_vins),
            published=len(messages),
            fleet_ready_s=self.fleet_ready_s,
            moved_units=len(moved),
            ready_s=self.ready_s,
            exit_codes=self.exit_codes,
            settle_s=self.ended - self.last_ready_at,
            moved_messages_in_transition=sum(
                1
                for at, part in self.paced.slices
                if self.started <= at <= self.ended
                for m in part
                if _unit(group, m) in moved
            ),
            duplicated=result.duplicated,
            duplicated_moved=sum(1 for m in doubled if _unit(group, m) in moved),
            duplicated_by_writers=dict(
                Counter("+".join(sorted(written[m.message_id])) for m in doubled)
            ),
            snapshots=tuple(self.snapshots),
            subscription_problems=tuple(problems[:5]),
            still_hosted=still_hosted,
            final_exit_codes=final_exit_codes,
            largest_gap_s=self.paced.largest_gap_s,
            tally=result,
            phases=tuple(self.phases.figures(self.paced.slices, written)),
        )


def _unit(group: ReplicaGroup, message: Message) -> str:
    return group.unit_of(message)


def _moved_units(group: ReplicaGroup, old: Sequence[str], new: Sequence[str]) -> set[str]:
    """The fleet's VINs (and the V2 topic's key) whose owner differs between the two lists."""
    units = [*group.fleet_vins, APP_TOPIC_KEY]
    return {unit for unit in units if owner(unit, old) != owner(unit, new)}


def _lists(group: ReplicaGroup, new_members: Sequence[str]) -> str:
    """Which running replicas are configured with the new list, as 'new r0 r1, old r2'."""
    new: list[str] = []
    old: list[str] = []
    for index, tree in enumerate(group.trees):
        if group.running(index):
            (new if list(tree["replica"]["members"]) == list(new_members) else old).append(
                group.replica_id(index)
            )
    return f"new {' '.join(new) or '-'}, old {' '.join(old) or '-'}"


def _restart_with_members(group: ReplicaGroup, index: int, members: Sequence[str]) -> int:
    """SIGTERM replica ``index``, rewrite its settings with ``members``, start it, wait until
    ready; its exit code."""
    process, tree = group.processes[index], group.trees[index]
    exit_code = _stop_process(process)
    tree["replica"]["members"] = list(members)
    write_settings(tree, process.config)
    process.start()
    wait_ready(tree, timeout_s=EVENT_TIMEOUT_S)
    return exit_code


def _snapshot(group: ReplicaGroup, moved: set[str], phase: str) -> SubscriptionSnapshot:
    held = group.subscriptions()
    prefix = group.topic_prefix
    holders: Counter[str] = Counter()
    for unit in moved:
        topic_filter = prefix if unit == APP_TOPIC_KEY else vin_filter(prefix, unit)
        holders["+".join(sorted(held.get(topic_filter, set()))) or "none"] += 1
    return SubscriptionSnapshot(phase, dict(holders), group.leader(), group.hosted_sessions())
