"""Several ``hm-ingest run`` replicas on one broker, and the proof that they share one stream.

:func:`run_takeover` is the scenario the replica tests and ``bench/replicas_bench.py`` run: N
replicas (one SQLite coordination file, one output folder) take a stream of messages across
thousands of VINs; one replica is SIGKILLed mid-stream; another takes over its session; the
killed replica is restarted and rejoins; then every published message must be in the output
exactly once, and the figures (spread, take-over time) are returned.

Two modes, as ``[replica] mode``:

* ``shared``: one MQTT shared subscription; the leader *adopts* a lost replica's session (drains
  it and deletes it on the broker).
* ``vin``: each replica subscribes the per-VIN topics its members' hash gives it. The VINs come
  from the clearance state, so the group also runs the HM emulator (:mod:`.fleet_emulator`) and
  writes the fleet file the leader adds VINs from; the leader *hosts* a lost replica's session
  until it comes back and asks for it. The proof then also checks the routing: every message is
  written by the owner of its VIN (for a V2 envelope: the V2 topic's owner under MQTT 3.1.1, its
  VIN's owner under MQTT 5, where every session takes the topic) or, for the lost replica's VINs,
  by whoever hosted its session.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import pyarrow.parquet as pq

from ingest.replica.coordination import Coordinator
from ingest.replica.envelopes import EnvelopeRule, envelope_key, rules_of
from ingest.replica.shards import APP_TOPIC_KEY, filters_of, owner
from ingest.testing.accounting import Tally, payload_message_id, tally
from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import CertBundle
from ingest.testing.daemon import (
    APP_ID,
    DaemonProcess,
    daemon_config,
    wait_for,
    wait_ready,
    write_toml,
)
from ingest.testing.faultpoints import CRASH_ENV
from ingest.testing.fleet_emulator import FleetEmulator, write_fleet_file
from ingest.testing.publish import Publisher
from ingest.testing.traffic import ENVIRONMENT, LEVEL, Message, make_vin, stream

T = TypeVar("T")
Mode = Literal["shared", "vin"]
Kill = Literal["follower", "leader", "follower-logged-unacked"]

# part-<replica>-<first>-<last>.parquet: the replica that wrote a file, from its name.
_REPLICA_FILE = re.compile(r"part-(.+)-\d{20}-\d{20}\.parquet")
ADOPTED_LINE = "adopted the session of replica {replica}"
HOSTING_LINE = "hosting the session of replica {replica}"
RELEASED_LINE = "released the session of replica {replica}"
# The V2 topic carries every vehicle's envelopes and belongs to one replica in vin mode: a small
# share keeps that replica's load near the others' while still proving the topic is covered.
VIN_MODE_V2_FRACTION = 0.02
# Under MQTT 5 the envelopes are spread by VIN like the rest: a large share proves it.
SPREAD_V2_FRACTION = 0.5
# Generous: thousands of VINs are added at HM (100 per request) and subscribed (by three
# replicas) on a 2-core machine shared with other work.
FLEET_READY_TIMEOUT_S = 180.0
# How much of the replicas' logs a failing scenario prints (the end, where the failure is).
FAILURE_LOG_CHARS = 20_000


@dataclass
class ReplicaGroup:
    """``count`` daemons configured as replicas ``r0``..``r<count-1>`` of one group."""

    broker: MosquittoBroker
    certs: CertBundle
    workdir: Path
    count: int = 3
    lease_s: float = 4.0
    heartbeat_s: float = 1.0
    client: str = "auto"
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Variables for one replica's first start only (by index): a fault point that crashes it.
    first_start_env: dict[int, dict[str, str]] = field(default_factory=dict)
    mode: Mode = "shared"
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    # vin mode: the desired fleet at start (the fleet file), the emulator's pending → approved
    # delay and the fleet control loop's interval.
    fleet_vins: list[str] = field(default_factory=list)
    decision_delay_s: float = 0.5
    fleet_interval_s: float = 1.0
    processes: list[DaemonProcess] = field(default_factory=list)
    trees: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    emulator: FleetEmulator | None = None

    @property
    def output(self) -> Path:
        return self.workdir / "data"

    @property
    def coordination_url(self) -> str:
        return f"sqlite:///{self.workdir / 'coordination.sqlite3'}"

    @property
    def fleet_file(self) -> Path:
        return self.workdir / "fleet.csv"

    @property
    def members(self) -> list[str]:
        return [self.replica_id(index) for index in range(self.count)]

    @property
    def topic_prefix(self) -> str:
        """``live/level13/<app>``: the V2 topic, and the parent of every per-VIN topic."""
        return f"{ENVIRONMENT}/{LEVEL}/{APP_ID}"

    @property
    def spreads_envelopes(self) -> bool:
        """Every session takes the V2 topic and keeps its VINs' envelopes (vin mode, MQTT 5)."""
        return self.mode == "vin" and self.protocol == "5"

    @property
    def v2_fraction(self) -> float:
        """The share of V2 envelopes in the scenarios' streams."""
        if self.mode != "vin":
            return 0.0
        return SPREAD_V2_FRACTION if self.spreads_envelopes else VIN_MODE_V2_FRACTION

    def replica_id(self, index: int) -> str:
        return f"r{index}"

    def running(self, index: int) -> bool:
        proc = self.processes[index].proc
        return proc is not None and proc.poll() is None

    def start(self) -> None:
        """Start r0, wait until it leads, then the others: the leader is known (r0)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.mode == "vin":
            self._start_fleet()
        # vin mode: r0 alone first also hosts the sessions of r1.. (members that never started
        # are hosted like lost ones), which they take back when they start.
        ready_timeout_s = 60.0 if self.mode == "shared" else 120.0
        for index in range(self.count):
            tree = self._launch(index)
            if index == 0:
                wait_ready(tree, timeout_s=ready_timeout_s)
                wait_for(lambda: self.leader() == "r0", 30, "r0 to lead")
        for tree in self.trees:
            wait_ready(tree, timeout_s=ready_timeout_s)

    def add_replica(self, *, ready_timeout_s: float) -> None:
        """Start one more replica (the next id) and wait until it is ready; the group's member
        list (and so every owner it computes) includes it from now on."""
        index = self.count
        self.count += 1
        wait_ready(self._launch(index), timeout_s=ready_timeout_s)

    def _launch(self, index: int) -> dict[str, dict[str, Any]]:
        """Write replica ``index``'s settings and start it; returns its settings tree."""
        folder = self.workdir / self.replica_id(index)
        tree = daemon_config(
            self.broker, self.certs, folder, client_id="hm-ingest", overrides=self._overrides(index)
        )
        process = DaemonProcess(
            write_toml(tree, folder.with_suffix(".toml")), folder.with_suffix(".log")
        )
        self.trees.append(tree)
        self.processes.append(process)
        process.start(self.first_start_env.get(index))
        return tree

    def _start_fleet(self) -> None:
        write_fleet_file(self.fleet_file, self.fleet_vins)
        self.emulator = FleetEmulator(
            self.workdir / "emulator", decision_delay_s=self.decision_delay_s
        )
        self.emulator.start()

    def _overrides(self, index: int) -> dict[str, dict[str, Any]]:
        overrides: dict[str, dict[str, Any]] = {
            "mqtt": {"client": self.client, "protocol": self.protocol},
            "output": {"path": str(self.output), "flush_age_s": 0.5},
            "replica": {
                "id": self.replica_id(index),
                "coordination": self.coordination_url,
                "lease_s": self.lease_s,
                "heartbeat_s": self.heartbeat_s,
            },
        }
        if self.mode == "vin":
            assert self.emulator is not None
            overrides["replica"] |= {
                "mode": "vin",
                # Comma-separated (the form HM_INGEST_REPLICA_MEMBERS takes): write_toml writes
                # scalars only.
                "members": self.members,
            }
            overrides["api"] = self.emulator.api_settings()
            overrides["fleet"] = {
                "enabled": True,
                "file": str(self.fleet_file),
                "interval_s": self.fleet_interval_s,
            }
        for section, values in self.extra.items():
            overrides.setdefault(section, {}).update(values)
        return overrides

    def leader(self) -> str | None:
        return self._observe(Coordinator.leader)

    def _observe(self, read: Callable[[Coordinator], T]) -> T:
        """One read of the coordination database, as an observer that joins nothing."""
        with Coordinator.open(
            self.coordination_url, replica="observer", lease_s=self.lease_s
        ) as coordinator:
            return read(coordinator)

    def index_of(self, replica: str) -> int:
        return int(replica.removeprefix("r"))

    def restart(self, index: int) -> None:
        self.processes[index].start()
        wait_ready(self.trees[index], timeout_s=120)

    def stop(self) -> list[int]:
        """SIGTERM every running replica; their exit codes (None for one already dead)."""
        running = [p for p in self.processes if p.proc is not None and p.proc.poll() is None]
        for process in running:
            process.signal(signal.SIGTERM)
        return [process.wait(60) for process in running]

    def kill_all(self) -> None:
        """Tear down: SIGKILL the replicas, stop the emulator (vin mode)."""
        for process in self.processes:
            process.kill()
        if self.emulator is not None:
            self.emulator.stop()

    def logs(self) -> str:
        return "\n".join(p.log_text() for p in self.processes)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Tear down; after a failure, print the replicas' last log lines first (pytest shows
        them with the failure)."""
        if exc_type is not None:
            print(self.logs()[-FAILURE_LOG_CHARS:])
        self.kill_all()

    # -- vin mode -------------------------------------------------------------------------------

    def owner_of(self, message: Message) -> str:
        """The replica whose subscription carries ``message`` in vin mode."""
        return owner(self.unit_of(message), self.members)

    def unit_of(self, message: Message) -> str:
        """The VIN of a per-VIN topic; for a V2 envelope the V2 topic's key (its topic names no
        VIN), or, when every session takes the topic, the VIN the envelope names."""
        if message.topic != self.topic_prefix:
            return message.vin
        if self.spreads_envelopes:
            return envelope_key(message.payload, max_payload_bytes=1 << 30)
        return APP_TOPIC_KEY

    def add_to_fleet(self, vins: Iterable[str]) -> None:
        """Append ``vins`` to the fleet file: the leader adds them at HM on its next cycle."""
        self.fleet_vins = [*self.fleet_vins, *vins]
        write_fleet_file(self.fleet_file, self.fleet_vins)

    def subscriptions(self) -> dict[str, set[str]]:
        """Topic filter → the replica sessions the coordination database says hold it."""
        return self._observe(Coordinator.subscriptions)

    def hosted_sessions(self) -> dict[str, str]:
        """Lost replica → the replica hosting (or draining) its session now."""
        return self._observe(Coordinator.claims)

    def subscription_problems(self, vins: Iterable[str]) -> list[str]:
        """What is wrong with the subscriptions for ``vins`` (plus the V2 topic): a filter held
        by no session, by another session than its owner's, or by several."""
        held = self.subscriptions()
        problems = []
        spread = self.spreads_envelopes
        for member in self.members:
            owned = filters_of(member, self.members, self.topic_prefix, vins, app_topic=not spread)
            for topic_filter in sorted(owned):
                holders = held.get(topic_filter, set())
                if holders != {member}:
                    problems.append(f"{topic_filter} held by {sorted(holders)}, owner {member}")
        if spread:
            # Every session takes the V2 topic by the list in force alone once it has settled.
            lists = self.member_lists()
            rules = rules_of(held)
            for member in self.members:
                if not lists or rules.get(member) != EnvelopeRule.of(max(lists)):
                    problems.append(
                        f"{member}'s V2 envelope rule is {rules.get(member)}, not list "
                        f"{max(lists, default=0)} alone"
                    )
        return problems

    def member_lists(self) -> dict[int, list[str]]:
        """The member lists the leader published, by epoch."""
        return self._observe(Coordinator.member_lists)

    def wait_fleet_ready(self, vins: Sequence[str], timeout_s: float) -> float:
        """Wait until HM approved every one of ``vins``, each VIN's (and the V2 topic's) filter
        is held by its owner's session only, and no session is hosted; the seconds it took."""
        assert self.emulator is not None, "wait_fleet_ready is for vin mode"
        emulator = self.emulator
        started = time.monotonic()
        wanted = set(vins)

        def approved() -> bool:
            statuses = emulator.statuses()
            return all(statuses.get(vin) == "approved" for vin in wanted)

        def settled() -> bool:
            return not self.hosted_sessions() and not self.subscription_problems(vins)

        try:
            wait_for(approved, timeout_s, f"HM to approve the {len(wanted)} fleet VINs")
            left = max(1.0, timeout_s - (time.monotonic() - started))
            wait_for(settled, left, "every VIN subscribed by its owner and no session hosted")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self._fleet_state(vins)}") from exc
        return time.monotonic() - started

    def _fleet_state(self, vins: Sequence[str]) -> str:
        assert self.emulator is not None
        statuses = Counter(self.emulator.statuses().get(vin, "unknown at HM") for vin in vins)
        problems = self.subscription_problems(vins)
        return (
            f"HM statuses {dict(statuses)}; hosted sessions {self.hosted_sessions()}; "
            f"{len(problems)} subscription problems {problems[:5]}"
        )


def messages_per_replica(output: Path, message_ids: set[str] | None = None) -> Counter[str]:
    """Distinct messages (of ``message_ids``, or all) each replica wrote to ``telemetry/``."""
    seen: dict[str, set[str]] = {}
    for path in sorted((output / "telemetry").glob("*/*.parquet")):
        match = _REPLICA_FILE.fullmatch(path.name)
        replica = match.group(1) if match else ""
        ids = set(pq.read_table(path, columns=["message_id"]).column("message_id").to_pylist())
        if message_ids is not None:
            ids &= message_ids
        seen.setdefault(replica, set()).update(ids)
    return Counter({replica: len(ids) for replica, ids in seen.items()})


def writers(output: Path) -> dict[str, set[str]]:
    """Message id → the replicas that wrote it (to ``telemetry/`` or ``rejected/``)."""
    found: dict[str, set[str]] = {}
    for table in ("telemetry", "rejected"):
        for path in sorted((output / table).glob("*/*.parquet")):
            match = _REPLICA_FILE.fullmatch(path.name)
            replica = match.group(1) if match else ""
            for message_id in _message_ids(path, table):
                found.setdefault(message_id, set()).add(replica)
    return found


def _message_ids(path: Path, table: str) -> list[str]:
    if table == "telemetry":
        return [m for m in pq.read_table(path, columns=["message_id"]).column(0).to_pylist() if m]
    rows = pq.read_table(path, columns=["message_id", "payload"]).to_pylist()
    ids = [row["message_id"] or payload_message_id(row["payload"]) for row in rows]
    return [message_id for message_id in ids if message_id]


@dataclass(frozen=True)
class Routing:
    """Where vin mode's messages were written, against where their subscription sends them."""

    hosted: int  # the lost replica's messages written by another replica (its host)
    misrouted: int  # messages of a live replica's VINs written by another replica
    misrouted_examples: tuple[str, ...] = ()


def routing(
    group: ReplicaGroup, traffic: Sequence[Message], lost: str | None, output: Path
) -> Routing:
    """Compare each message's writers with its owner; ``lost``'s messages may have any."""
    written = writers(output)
    hosted = 0
    misrouted: list[str] = []
    for message in traffic:
        expected = group.owner_of(message)
        others = written.get(message.message_id, set()) - {expected}
        if not others:
            continue
        if expected == lost:
            hosted += 1
        else:
            misrouted.append(f"{message.message_id} ({expected}'s) by {sorted(others)}")
    return Routing(hosted, len(misrouted), tuple(misrouted[:5]))


@dataclass(frozen=True)
class TakeoverReport:
    replicas: int
    vins: int
    published: int
    killed: str
    killed_role: str
    # SIGKILL → the leader has adopted and deleted the lost session (shared mode) or is hosting
    # it (vin mode)
    takeover_s: float
    # shared: what the adoption log lines count; vin: the lost replica's messages another wrote
    adopted_messages: int
    spread: dict[str, int]  # messages published before the kill, per replica that wrote them
    tally: Tally
    rejoin_s: float  # restart of the killed replica → ready again
    publish_rate: float
    mode: Mode = "shared"
    # vin mode only: what the owners' subscriptions predict for `spread`; restart of the killed
    # replica → its host logged the release; messages a replica wrote for another's live VINs;
    # start → fleet approved and subscribed
    expected_spread: dict[str, int] = field(default_factory=dict)
    release_s: float | None = None
    misrouted: int = 0
    misrouted_examples: tuple[str, ...] = ()
    fleet_ready_s: float | None = None
    # vin mode, at the end: filters not held by exactly their owner's session (the restarted
    # replica took its session back and it holds what it held before), and sessions still hosted
    subscription_problems: tuple[str, ...] = ()
    still_hosted: dict[str, str] = field(default_factory=dict)

    @property
    def spread_ratio(self) -> float:
        """Largest share over smallest share among the replicas (1.0 is perfectly even)."""
        counts = list(self.spread.values())
        return max(counts) / max(1, min(counts)) if counts else float("inf")


def _paced(
    publisher: Publisher, messages: Sequence[Message], rate: float, chunk: int = 250
) -> None:
    started = time.monotonic()
    for offset in range(0, len(messages), chunk):
        part = messages[offset : offset + chunk]
        publisher.publish_many([(m.topic, m.payload) for m in part])
        due = started + (offset + len(part)) / rate
        if (pause := due - time.monotonic()) > 0:
            time.sleep(pause)


def run_takeover(
    group: ReplicaGroup,
    *,
    messages: int = 15_000,
    vins: int = 3_000,
    rate: float = 1_500.0,
    kill: Kill = "follower",
    progress: Callable[[str], None] = lambda _line: None,
) -> TakeoverReport:
    """The scenario described in the module docstring; the group is started here."""
    vin_mode = group.mode == "vin"
    traffic = list(stream(APP_ID, messages, vehicles=vins, v2_fraction=group.v2_fraction, seed=11))
    before, during, after = (
        traffic[: messages // 3],
        traffic[messages // 3 : 2 * messages // 3],
        traffic[2 * messages // 3 :],
    )
    # r0 starts first and so leads; the victim is r0 (leader) or r1 (a follower).
    victim = 0 if kill == "leader" else 1
    victim_id = group.replica_id(victim)
    crashes_itself = kill == "follower-logged-unacked"
    if crashes_itself:
        # r1 dies by itself right after a group of its messages is durable in its log and
        # before their PUBACKs: messages that both it (in its log) and the adopter (redelivered
        # by the broker) end up holding, which the adopted keys must keep from being written
        # twice. Its 50th group falls in the first third of the stream.
        group.first_start_env[victim] = {CRASH_ENV: "wal.logged:50"}
    fleet_ready_s: float | None = None
    if vin_mode:
        fleet_ready_s = _start_vin_group(group, vins, progress)
    else:
        group.start()
    leader = group.leader()
    progress(f"{group.count} replicas ready, leader {leader}; killing {victim_id} ({kill})")
    takeover_line = (HOSTING_LINE if vin_mode else ADOPTED_LINE).format(replica=victim_id)
    release_line = RELEASED_LINE.format(replica=victim_id)
    # Both watched from now: the self-crash happens at a moment the test does not choose. The
    # logs may already hold these lines (vin mode: r0 hosted the others until they started).
    takeover = _Watch(_new_line(group, takeover_line))
    death = _Watch(lambda: not group.running(victim))
    with Publisher(group.broker, group.certs, timeout_s=120) as publisher:
        started = time.monotonic()
        _paced(publisher, before, rate)
        if not crashes_itself:
            group.processes[victim].kill()
        killed_at = death.wait(60, f"{victim_id} to die")
        _paced(publisher, during, rate)
        takeover_s = takeover.wait(120, f"'{takeover_line}' in a log") - killed_at
        _paced(publisher, after[: len(after) // 2], rate)
        release = _Watch(_new_line(group, release_line)) if vin_mode else None
        rejoin_started = time.monotonic()
        group.restart(victim)
        rejoin_s = time.monotonic() - rejoin_started
        _paced(publisher, after[len(after) // 2 :], rate)
        publish_rate = messages / max(1e-9, time.monotonic() - started - rejoin_s)
        release_s = (
            release.wait(60, f"'{release_line}' in a log") - rejoin_started if release else None
        )
    progress(f"published {messages}; waiting for every message to be committed")
    ids = [m.message_id for m in traffic]
    # On a timeout the tally below reports what is missing.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: tally(group.output, ids).lost == 0, 120, "every message committed")
    problems = group.subscription_problems(group.fleet_vins) if vin_mode else []
    still_hosted = group.hosted_sessions() if vin_mode else {}
    codes = group.stop()
    if any(code != 0 for code in codes):
        progress(f"exit codes {codes}")
    result = tally(group.output, ids)
    spread = messages_per_replica(group.output, {m.message_id for m in before})
    routed = routing(group, traffic, victim_id, group.output) if vin_mode else None
    return TakeoverReport(
        replicas=group.count,
        vins=len({m.vin for m in traffic}),
        published=messages,
        killed=victim_id,
        killed_role=kill,
        takeover_s=takeover_s,
        adopted_messages=routed.hosted if routed else _adopted_count(group, victim_id),
        spread=dict(spread),
        tally=result,
        rejoin_s=rejoin_s,
        publish_rate=publish_rate,
        mode=group.mode,
        expected_spread=dict(Counter(group.owner_of(m) for m in before)) if vin_mode else {},
        release_s=release_s,
        misrouted=routed.misrouted if routed else 0,
        misrouted_examples=routed.misrouted_examples if routed else (),
        fleet_ready_s=fleet_ready_s,
        subscription_problems=tuple(problems[:5]),
        still_hosted=still_hosted,
    )


def _start_vin_group(group: ReplicaGroup, vins: int, progress: Callable[[str], None]) -> float:
    """vin mode: start with every test VIN in the fleet file, and wait until each is approved
    at HM and subscribed by its owner (a message to a topic nobody subscribes is dropped)."""
    if not group.fleet_vins:
        group.fleet_vins = [make_vin(index) for index in range(vins)]
    started = time.monotonic()
    group.start()
    progress(f"{group.count} replicas started; waiting for {vins} VINs approved and subscribed")
    group.wait_fleet_ready(group.fleet_vins, FLEET_READY_TIMEOUT_S)
    return time.monotonic() - started


def _new_line(group: ReplicaGroup, line: str) -> Callable[[], bool]:
    """A condition: ``line`` appears in the logs once more than it does now."""
    already = group.logs().count(line)
    return lambda: group.logs().count(line) > already


_ADOPTED = re.compile(r"adopted the session of replica (\S+): (\d+) message")


def _adopted_count(group: ReplicaGroup, replica: str) -> int:
    return sum(
        int(match.group(2))
        for match in _ADOPTED.finditer(group.logs())
        if match.group(1) == replica
    )


class _Watch:
    """Notes the moment ``condition`` first holds (polled every 50 ms on its own thread)."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self._condition = condition
        self._seen_at: float | None = None
        self._done = threading.Event()
        threading.Thread(target=self._poll, name="watch", daemon=True).start()

    def _poll(self) -> None:
        while not self._done.is_set():
            if self._condition():
                self._seen_at = time.monotonic()
                self._done.set()
                return
            self._done.wait(0.05)

    def wait(self, timeout_s: float, what: str) -> float:
        """The monotonic time the condition first held; raises TimeoutError."""
        if not self._done.wait(timeout_s) or self._seen_at is None:
            self._done.set()
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        return self._seen_at
