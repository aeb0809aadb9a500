"""Several ``hm-ingest run`` replicas on one broker, and the proof that they share one stream.

:func:`run_takeover` is the scenario the replica tests and ``bench/replicas_bench.py`` run: N
replicas (one shared subscription, one SQLite coordination file, one output folder) take a stream
of messages across thousands of VINs; one replica is SIGKILLed mid-stream; the leader adopts its
session; the killed replica is restarted and rejoins; then every published message must be in the
output exactly once, and the figures (spread, take-over time) are returned.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from ingest.replica.coordination import Coordinator
from ingest.testing.accounting import Tally, tally
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
from ingest.testing.publish import Publisher
from ingest.testing.traffic import Message, stream

# part-<replica>-<first>-<last>.parquet: the replica that wrote a file, from its name.
_REPLICA_FILE = re.compile(r"part-(.+)-\d{20}-\d{20}\.parquet")
ADOPTED_LINE = "adopted the session of replica {replica}"


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
    processes: list[DaemonProcess] = field(default_factory=list)
    trees: list[dict[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return self.workdir / "data"

    @property
    def coordination_url(self) -> str:
        return f"sqlite:///{self.workdir / 'coordination.sqlite3'}"

    def replica_id(self, index: int) -> str:
        return f"r{index}"

    def running(self, index: int) -> bool:
        proc = self.processes[index].proc
        return proc is not None and proc.poll() is None

    def start(self) -> None:
        """Start r0, wait until it leads, then the others: the leader is known (r0)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            folder = self.workdir / self.replica_id(index)
            overrides: dict[str, dict[str, Any]] = {
                "mqtt": {"client": self.client},
                "output": {"path": str(self.output), "flush_age_s": 0.5},
                "replica": {
                    "id": self.replica_id(index),
                    "coordination": self.coordination_url,
                    "lease_s": self.lease_s,
                    "heartbeat_s": self.heartbeat_s,
                },
            }
            for section, values in self.extra.items():
                overrides.setdefault(section, {}).update(values)
            tree = daemon_config(
                self.broker, self.certs, folder, client_id="hm-ingest", overrides=overrides
            )
            config = write_toml(tree, folder.with_suffix(".toml"))
            process = DaemonProcess(config, folder.with_suffix(".log"))
            self.trees.append(tree)
            self.processes.append(process)
            process.start(self.first_start_env.get(index))
            if index == 0:
                wait_ready(tree, timeout_s=60)
                wait_for(lambda: self.leader() == "r0", 30, "r0 to lead")
        for tree in self.trees:
            wait_ready(tree, timeout_s=60)

    def leader(self) -> str | None:
        with Coordinator.open(
            self.coordination_url, replica="observer", lease_s=self.lease_s
        ) as coordinator:
            return coordinator.leader()

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
        for process in self.processes:
            process.kill()

    def logs(self) -> str:
        return "\n".join(p.log_text() for p in self.processes)


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


@dataclass(frozen=True)
class TakeoverReport:
    replicas: int
    vins: int
    published: int
    killed: str
    killed_role: str
    takeover_s: float  # SIGKILL → the leader has adopted and deleted the lost session
    adopted_messages: int
    spread: dict[str, int]  # messages published before the kill, per replica that wrote them
    tally: Tally
    rejoin_s: float  # restart of the killed replica → ready again
    publish_rate: float

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
    kill: Literal["follower", "leader", "follower-logged-unacked"] = "follower",
    progress: Callable[[str], None] = lambda _line: None,
) -> TakeoverReport:
    """The scenario described in the module docstring; the group is started here."""
    traffic = list(stream(APP_ID, messages, vehicles=vins, v2_fraction=0.0, seed=11))
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
    group.start()
    leader = group.leader()
    progress(f"{group.count} replicas ready, leader {leader}; killing {victim_id} ({kill})")
    # Both watched from now: the self-crash happens at a moment the test does not choose.
    adoption = _Watch(lambda: ADOPTED_LINE.format(replica=victim_id) in group.logs())
    death = _Watch(lambda: not group.running(victim))
    with Publisher(group.broker, group.certs, timeout_s=120) as publisher:
        started = time.monotonic()
        _paced(publisher, before, rate)
        if not crashes_itself:
            group.processes[victim].kill()
        killed_at = death.wait(60, f"{victim_id} to die")
        _paced(publisher, during, rate)
        takeover_s = adoption.wait(120, f"the session of {victim_id} adopted") - killed_at
        _paced(publisher, after[: len(after) // 2], rate)
        rejoin_started = time.monotonic()
        group.restart(victim)
        rejoin_s = time.monotonic() - rejoin_started
        _paced(publisher, after[len(after) // 2 :], rate)
        publish_rate = messages / max(1e-9, time.monotonic() - started - rejoin_s)
    progress(f"published {messages}; waiting for every message to be committed")
    ids = [m.message_id for m in traffic]
    # On a timeout the tally below reports what is missing.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: tally(group.output, ids).lost == 0, 120, "every message committed")
    codes = group.stop()
    if any(code != 0 for code in codes):
        progress(f"exit codes {codes}")
    result = tally(group.output, ids)
    spread = messages_per_replica(group.output, {m.message_id for m in before})
    return TakeoverReport(
        replicas=group.count,
        vins=len({m.vin for m in traffic}),
        published=messages,
        killed=victim_id,
        killed_role=kill,
        takeover_s=takeover_s,
        adopted_messages=_adopted_count(group, victim_id),
        spread=dict(spread),
        tally=result,
        rejoin_s=rejoin_s,
        publish_rate=publish_rate,
    )


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
