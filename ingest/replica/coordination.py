"""The database replicas share: membership leases, drain claims, adopted keys and leader leases.

Several daemons (replicas) read one application's stream through an MQTT shared subscription.
They coordinate through one small database, SQLite (replicas on one host) or PostgreSQL
(replicas anywhere), with these tables:

* ``hm_replica_members``: one row per replica, ``expires_at`` renewed by its heartbeat (its
  *membership lease*). A row whose lease ran out marks a replica presumed dead.
* ``hm_replica_drains``: a *drain claim* on a dead replica, held by the leader that is taking the
  messages queued in the dead replica's broker session (connecting with its client id). While an
  unexpired claim exists the dead replica may not rejoin, and any claim fences its heartbeat.
* ``hm_replica_adopted``: dedupe keys of the messages a drain took from a replica ("adopted"),
  recorded *before* the drain acknowledges them. The replica, when it comes back, loads them into
  its dedupe index so its own log replay skips them, then forgets them.
* ``hm_replica_leases``: named leader leases; ``fleet-control`` elects the one replica that runs
  the fleet control loop (and drains dead replicas).
* ``hm_replica_subscriptions`` (VIN-sharded mode): the topic filters each replica's session holds;
  the leader registers a VIN at HM only once its filter is held, and a filter changes owner only
  once the new owner holds it.
* ``hm_replica_expected`` (VIN-sharded mode): configured members that have not joined yet, and
  since when; one that stays away for a lease is given an expired row and hosted.
* ``hm_replica_settings`` (VIN-sharded mode): the member list the leader publishes; every
  replica hashes over it, so a rolling change of ``[replica] members`` flips the whole group at
  once (when a replica with the new list leads) instead of leaving replicas that disagree. Each
  list published is also kept under its epoch (``members@<n>``), which V2 envelope rules name.
* ``hm_replica_returns`` (VIN-sharded mode): there a drain is a *hosting* that lasts until the
  member comes back; its refused ``try_join`` records a request here, which the host sees in
  ``renew_hosting`` and answers by handing the session back (``finish_drain``).
* ``hm_replica_known`` and ``hm_replica_claims`` (VIN-sharded mode): the newest member list each
  session reads the stream by, and the messages of VINs changing owner that a session claimed
  (:mod:`ingest.replica.handover`); ``settled@<n>`` in ``hm_replica_settings`` records when the
  group stopped having two sessions subscribed to one VIN after list ``n`` was published.

Lifecycle of a replica ``r``: ``try_join`` (retry while it answers False: a drain of ``r`` is in
progress), ``adopted_keys`` → dedupe index → ``forget_adopted``, then ``heartbeat`` every
``heartbeat_s``; when ``heartbeat`` answers False ``r`` was declared dead and must stop consuming.
The leader: ``try_claim_drain(r)`` → drain, ``record_adopted`` before each acknowledgement,
``renew_drain`` while it lasts → ``finish_drain(r)``.

Atomicity: every check-and-set runs in one *write transaction* that first serialises against all
other writers: ``BEGIN IMMEDIATE`` on SQLite (WAL journal, busy timeout), ``BEGIN`` followed by a
transaction-scoped advisory lock (``pg_advisory_xact_lock``) on PostgreSQL. Everything else is one
code path: the same portable SQL (``INSERT ... ON CONFLICT ... DO UPDATE``), written with ``?``
marks that become ``%s`` for psycopg. Times are the *callers'* wall clock (``clock``, seconds), so
hosts sharing a PostgreSQL database need synchronised clocks (NTP), with skew far below ``lease_s``.

A drain claim stays *its holder's* until someone else claims it after it expired, or the member
rejoins after it expired (``try_join`` deletes a stale claim). So ``renew_drain``,
``record_adopted`` and ``finish_drain`` check only that the claim row still names this replica:
if it does, nobody else can have touched the member in between, expired or not.

URLs (``[replica] coordination``):

* ``sqlite:////abs/path.sqlite3`` (SQLAlchemy's absolute form) or ``sqlite:///abs/path.sqlite3``
  (a plain ``file:``-style URL): both mean the absolute path ``/abs/path.sqlite3``. Relative paths
  are refused: replicas started from different working directories would silently use different
  files and each elect itself. The folder must exist (a missing shared volume is an error, not
  something to paper over by creating a local folder). SQLite only coordinates processes on one
  host: never put the file on a network filesystem.
* ``postgresql://user[:password]@host[:port]/db[?param=value...]`` or ``postgres://...``: handed
  to libpq as is, so any libpq parameter works; for a schema other than ``public`` add
  ``options=-csearch_path%3Dmyschema``. Needs the ``postgres`` extra (psycopg 3).

Thread safety: one ``Coordinator`` may be called from several threads (``asyncio.to_thread``);
calls are serialised by a lock because a connection runs one transaction at a time.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

from ingest.errors import ConfigError, IngestError

DEFAULT_ROLE = "fleet-control"
# What a replica hosting another's session does next (Coordinator.renew_hosting).
HostingState = Literal["keep", "release", "lost"]
_CONFIG_KEY = "replica.coordination"
# How long one call may wait for another replica's write transaction before it fails with a
# retriable CoordinationError (the caller retries on its next heartbeat). Write transactions last
# milliseconds, so hitting this means a stuck writer, not ordinary contention.
_LOCK_TIMEOUT_S = 5.0
# libpq settings used unless the URL sets them. A silently dead network path (no RST) would
# otherwise block a heartbeat for the kernel's TCP retry time (minutes) instead of failing it:
# tcp_user_timeout and the keepalives bound that to seconds.
_LIBPQ_DEFAULTS = {
    "connect_timeout": "10",
    "tcp_user_timeout": "10000",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
}
# Server-side bound on one statement (a 20k-key record_adopted takes well under a second).
_STATEMENT_TIMEOUT_S = 30
# PostgreSQL: a replica frozen in the middle of a write transaction (SIGSTOP, a paused VM) holds
# the advisory lock and would stall every other replica; the server ends such a session after
# this long, which releases the lock and rolls its transaction back.
_IDLE_IN_TRANSACTION_S = 30
# The advisory lock's first key ("HM"); the second is a hash of the schema, so deployments sharing
# one database in different schemas do not serialise against each other.
_ADVISORY_CLASS = 0x484D

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS hm_replica_members (
        replica TEXT PRIMARY KEY,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS hm_replica_drains (
        member TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    # adopted_by: which leader took the message, for an operator reading the table.
    """CREATE TABLE IF NOT EXISTS hm_replica_adopted (
        member TEXT NOT NULL,
        dedupe_key TEXT NOT NULL,
        adopted_by TEXT NOT NULL,
        PRIMARY KEY (member, dedupe_key)
    )""",
    """CREATE TABLE IF NOT EXISTS hm_replica_leases (
        role TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    # VIN-sharded mode: the topic filters each replica's session is subscribed to (SUBACKed).
    # leaving: 1 from the moment the session may UNSUBSCRIBE it (another session holds it).
    """CREATE TABLE IF NOT EXISTS hm_replica_subscriptions (
        replica TEXT NOT NULL,
        topic_filter TEXT NOT NULL,
        leaving INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (replica, topic_filter)
    )""",
    # Group-wide settings the leader publishes: "members", the member list every VIN-sharded
    # replica hashes over (one list for the whole group, even while their configurations differ).
    """CREATE TABLE IF NOT EXISTS hm_replica_settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    # VIN-sharded mode: a configured member without a membership row, since when the leader
    # has been waiting for it (it is hosted once a lease passes without it joining).
    """CREATE TABLE IF NOT EXISTS hm_replica_expected (
        member TEXT PRIMARY KEY,
        since DOUBLE PRECISION NOT NULL
    )""",
    # A replica that wants its session back from the replica hosting it (VIN-sharded mode).
    """CREATE TABLE IF NOT EXISTS hm_replica_returns (
        member TEXT PRIMARY KEY,
        requested_at DOUBLE PRECISION NOT NULL
    )""",
    # VIN-sharded mode: the newest member list (epoch) each session's intake applies.
    """CREATE TABLE IF NOT EXISTS hm_replica_known (
        session TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL
    )""",
    # VIN-sharded mode: a message of a VIN changing owner, claimed by the first session to read
    # it (claim_key: a hash of topic and payload, the same in every session's copy).
    """CREATE TABLE IF NOT EXISTS hm_replica_claims (
        claim_key TEXT PRIMARY KEY,
        member TEXT NOT NULL,
        claimed_at DOUBLE PRECISION NOT NULL
    )""",
)

_UPSERT_MEMBER = """
INSERT INTO hm_replica_members (replica, expires_at) VALUES (?, ?)
ON CONFLICT (replica) DO UPDATE SET expires_at = excluded.expires_at
"""
_UPSERT_DRAIN = """
INSERT INTO hm_replica_drains (member, holder, expires_at) VALUES (?, ?, ?)
ON CONFLICT (member) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
"""
_UPSERT_LEASE = """
INSERT INTO hm_replica_leases (role, holder, expires_at) VALUES (?, ?, ?)
ON CONFLICT (role) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
"""
_UPSERT_RETURN = """
INSERT INTO hm_replica_returns (member, requested_at) VALUES (?, ?)
ON CONFLICT (member) DO UPDATE SET requested_at = excluded.requested_at
"""
_INSERT_ABSENT_MEMBER = """
INSERT INTO hm_replica_members (replica, expires_at) VALUES (?, ?)
ON CONFLICT (replica) DO NOTHING
"""
_INSERT_EXPECTED = """
INSERT INTO hm_replica_expected (member, since) VALUES (?, ?)
ON CONFLICT (member) DO NOTHING
"""
_INSERT_SUBSCRIPTION = """
INSERT INTO hm_replica_subscriptions (replica, topic_filter, leaving) VALUES (?, ?, 0)
ON CONFLICT (replica, topic_filter) DO UPDATE SET leaving = 0
"""
_UPSERT_SETTING = """
INSERT INTO hm_replica_settings (name, value) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""
_UPSERT_KNOWN = """
INSERT INTO hm_replica_known (session, epoch) VALUES (?, ?)
ON CONFLICT (session) DO UPDATE SET epoch = excluded.epoch
"""
_INSERT_CLAIM = """
INSERT INTO hm_replica_claims (claim_key, member, claimed_at) VALUES (?, ?, ?)
ON CONFLICT (claim_key) DO NOTHING
"""
# Keys per SELECT ... IN (...): far below SQLite's limit on parameters (999 in old builds).
_KEYS_PER_SELECT = 500
_INSERT_ADOPTED = """
INSERT INTO hm_replica_adopted (member, dedupe_key, adopted_by) VALUES (?, ?, ?)
ON CONFLICT (member, dedupe_key) DO NOTHING
"""


class CoordinationError(IngestError):
    """The coordination database could not be reached or answered with an error.

    Retriable by default (connection lost, lock wait timed out): the caller tries again on its
    next heartbeat. Raised non-retriable when this replica lost a drain claim it was using
    (``record_adopted``, ``finish_drain``): the drain must stop without acknowledging anything.
    """

    retriable = True


@dataclass(frozen=True, slots=True)
class Member:
    """One row of the membership table, as seen at the time of the call."""

    replica: str
    expires_at: float
    alive: bool


@dataclass(frozen=True, slots=True)
class _Dialect:
    """The little that differs between SQLite and PostgreSQL; the SQL itself does not."""

    name: str
    begin: str  # starts a write transaction
    lock: str | None  # run first in every write transaction, before reading anything
    placeholder: str
    transient: tuple[type[Exception], ...]  # errors worth retrying: connection, lock timeout
    errors: tuple[type[Exception], ...]  # every error the driver raises
    is_lost: Callable[[Any], bool]  # the connection is unusable: open a new one


# hm_replica_settings names of the published member lists by epoch: members@1, members@2, ...
_MEMBERS_AT = "members@"
# ... and of the time the group settled after each list (no VIN subscribed by two sessions).
_SETTLED_AT = "settled@"


def _member_lists(tx: _Tx) -> dict[int, list[str]]:
    rows = tx.all("SELECT name, value FROM hm_replica_settings")  # a handful of rows
    lists: dict[int, list[str]] = {}
    current: list[str] | None = None
    for name, value in rows:
        members = [m for m in str(value).split(",") if m]
        epoch = str(name).removeprefix(_MEMBERS_AT)
        if name == "members":
            current = members
        elif epoch != name and epoch.isdigit():
            lists[int(epoch)] = members
    if current is not None and not lists:
        lists[1] = current  # published before lists had epochs: that one is the first
    return lists


def _rows_in(tx: _Tx, select: str, keys: Sequence[str], *params: object) -> list[tuple[Any, ...]]:
    """``select`` (ending in "IN") for ``keys``, _KEYS_PER_SELECT at a time; ``params`` fill the
    marks before the IN list."""
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(keys), _KEYS_PER_SELECT):
        part = list(keys[start : start + _KEYS_PER_SELECT])
        marks = ",".join("?" * len(part))
        rows.extend(tx.all(f"{select} ({marks})", *params, *part))
    return rows


def redact_url(url: str) -> str:
    """``url`` with any password (in the user info or a ``password=`` parameter) masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if "password" in query.lower():
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # Not urlunsplit: it drops the "//" of an empty host ("postgresql:///db").
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def sqlite_path(url: str) -> Path:
    """The absolute file path of a ``sqlite:`` URL (see the module docstring for the forms)."""
    rest = url[len("sqlite://") :]
    if "?" in rest or "#" in rest:
        raise ConfigError(
            f"replica.coordination = {url!r}: sqlite URLs take no parameters; "
            "use sqlite:////abs/path/coordination.sqlite3",
            key=_CONFIG_KEY,
        )
    if not rest.startswith("/") or rest.strip("/") == "":
        raise ConfigError(
            f"replica.coordination = {url!r} is not an absolute SQLite path; replicas must all "
            "name the same file whatever their working directory, so use "
            "sqlite:////abs/path/coordination.sqlite3",
            key=_CONFIG_KEY,
        )
    # "sqlite:////x" leaves "//x", "sqlite:///x" leaves "/x": both mean /x.
    return Path("/" + rest.lstrip("/"))


class Coordinator:
    """This replica's handle on the coordination database; see the module docstring."""

    def __init__(
        self,
        *,
        url: str,
        replica: str,
        lease_s: float,
        clock: Callable[[], float],
        dialect: _Dialect,
        connect: Callable[[], Any],
    ) -> None:
        # Use Coordinator.open: it validates the URL and creates the tables.
        self.replica = replica
        self._url = redact_url(url)
        self._lease_s = lease_s
        self._clock = clock
        self._dialect = dialect
        self._connect = connect
        self._lock = threading.Lock()
        self._conn: Any = None
        self._closed = False

    @classmethod
    def open(
        cls,
        url: str,
        *,
        replica: str,
        lease_s: float,
        clock: Callable[[], float] = time.time,
    ) -> Coordinator:
        """Connect to ``url``, create the tables if missing; ConfigError when that fails."""
        if not replica:
            raise ValueError("replica must be a non-empty id (replica.id)")
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, not {lease_s}")
        scheme = url.partition(":")[0].lower()
        if scheme == "sqlite":
            dialect, connect = _sqlite(url)
        elif scheme in ("postgresql", "postgres"):
            dialect, connect = _postgresql(url, replica)
        else:
            raise ConfigError(
                f"replica.coordination = {redact_url(url)!r}: unsupported database; use "
                "sqlite:////abs/path/coordination.sqlite3 (replicas on one host) or "
                "postgresql://user@host/db (replicas anywhere)",
                key=_CONFIG_KEY,
            )
        coordinator = cls(
            url=url, replica=replica, lease_s=lease_s, clock=clock, dialect=dialect, connect=connect
        )
        try:
            coordinator._create_tables()
        except CoordinationError as exc:
            coordinator.close()
            raise ConfigError(
                f"replica.coordination = {redact_url(url)!r}: cannot use the coordination "
                f"database: {_one_line(exc.__cause__ or exc)}; {_fix_hint(dialect.name)}",
                key=_CONFIG_KEY,
            ) from exc
        return coordinator

    @property
    def lease_s(self) -> float:
        return self._lease_s

    # -- membership ---------------------------------------------------------------------------

    def try_join(self) -> bool:
        """Upsert my membership lease; False (and no change) while a drain of me is in progress."""
        with self._write("join") as tx:
            now = self._clock()
            claim = tx.one(
                "SELECT expires_at FROM hm_replica_drains WHERE member = ?", self.replica
            )
            if claim is not None and claim[0] > now:
                # A replica hosting my session (VIN-sharded mode) hands it back when asked.
                tx.run(_UPSERT_RETURN, self.replica, now)
                return False
            # An expired claim: its holder died mid-drain. Deleting it fences that holder out
            # (its record_adopted/finish_drain now fail) before I start consuming again.
            tx.run("DELETE FROM hm_replica_drains WHERE member = ?", self.replica)
            tx.run("DELETE FROM hm_replica_returns WHERE member = ?", self.replica)
            tx.run("DELETE FROM hm_replica_expected WHERE member = ?", self.replica)
            tx.run(_UPSERT_MEMBER, self.replica, now + self._lease_s)
            return True

    def heartbeat(self) -> bool:
        """Renew my lease; False when my row is gone or a drain claims me: I must stop (fencing).

        An expired row nobody claimed is renewed: no one acted on my absence yet, since acting
        (draining) starts with a claim, and claiming and this renewal exclude each other.
        """
        with self._write("heartbeat") as tx:
            now = self._clock()
            if tx.one("SELECT holder FROM hm_replica_drains WHERE member = ?", self.replica):
                return False
            renewed = tx.run(
                "UPDATE hm_replica_members SET expires_at = ? WHERE replica = ?",
                now + self._lease_s,
                self.replica,
            )
            return renewed == 1

    def members(self) -> list[Member]:
        """Every membership row, ordered by replica id; ``alive`` is judged at the call's time."""
        with self._read("list members") as tx:
            rows = tx.all("SELECT replica, expires_at FROM hm_replica_members ORDER BY replica")
            now = self._clock()
        return [Member(replica, expires_at, expires_at > now) for replica, expires_at in rows]

    # -- draining a dead replica --------------------------------------------------------------

    def try_claim_drain(self, member: str) -> bool:
        """Claim (or renew my claim on) ``member``'s session; True when it is mine to drain.

        Only another replica whose membership row exists and expired can be claimed, and only
        when no one else holds an unexpired claim on it.
        """
        if member == self.replica:
            return False
        with self._write("claim drain") as tx:
            now = self._clock()
            row = tx.one("SELECT expires_at FROM hm_replica_members WHERE replica = ?", member)
            if row is None or row[0] > now:
                return False
            claim = tx.one(
                "SELECT holder, expires_at FROM hm_replica_drains WHERE member = ?", member
            )
            if claim is not None and claim[0] != self.replica and claim[1] > now:
                return False
            tx.run(_UPSERT_DRAIN, member, self.replica, now + self._lease_s)
            return True

    def renew_drain(self, member: str) -> bool:
        """Extend my claim on ``member``; False when the claim is no longer mine."""
        with self._write("renew drain") as tx:
            return self._renew_claim(tx, member)

    def renew_hosting(self, member: str) -> HostingState:
        """Like :meth:`renew_drain` for a hosted session: ``release`` once ``member`` asked for
        it back (its ``try_join`` is waiting), ``lost`` when the claim is no longer mine."""
        with self._write("renew hosting") as tx:
            if not self._renew_claim(tx, member):
                return "lost"
            asked = tx.one("SELECT 1 FROM hm_replica_returns WHERE member = ?", member)
            return "release" if asked else "keep"

    def abandon_drain(self, member: str) -> None:
        """Drop my claim on ``member`` now (shutting down), so another replica need not wait for
        it to expire; its membership row stays expired, so the next leader claims it."""
        with self._write("abandon drain") as tx:
            tx.run(
                "DELETE FROM hm_replica_drains WHERE member = ? AND holder = ?",
                member,
                self.replica,
            )

    def ensure_members(self, members: Sequence[str]) -> None:
        """Make a configured member that has not joined for a lease look lost, so it is hosted
        like one: its VINs need a subscriber even if it never starts.

        The first call that finds no membership row starts its wait (``hm_replica_expected``);
        once a lease has passed the member gets an *expired* row, which the leader claims. A
        row that is not there yet is never shown as live (``hm-ingest check`` would take a
        replica's first start for a second replica with its id).
        """
        with self._write("ensure members") as tx:
            now = self._clock()
            present = {r for (r,) in tx.all("SELECT replica FROM hm_replica_members")}
            waiting = dict(tx.all("SELECT member, since FROM hm_replica_expected"))
            absent = [m for m in members if m not in present]
            tx.many(_INSERT_EXPECTED, [(m, now) for m in absent if m not in waiting])
            overdue = [m for m in absent if m in waiting and now - waiting[m] >= self._lease_s]
            tx.many(_INSERT_ABSENT_MEMBER, [(m, waiting[m] + self._lease_s) for m in overdue])
            tx.many("DELETE FROM hm_replica_expected WHERE member = ?", [(m,) for m in overdue])

    def claims(self) -> dict[str, str]:
        """Every drain or hosting claim: member → the replica holding it (expired or not)."""
        with self._read("read claims") as tx:
            return dict(tx.all("SELECT member, holder FROM hm_replica_drains ORDER BY member"))

    def record_adopted(self, member: str, keys: Sequence[str]) -> None:
        """Durably record ``keys`` as adopted from ``member`` (idempotent), in one transaction.

        Raises a non-retriable CoordinationError when my claim on ``member`` is gone: the member
        may already have rejoined and loaded its adopted keys, so the drain must stop and must
        not acknowledge these messages.
        """
        if not keys:
            return
        with self._write("record adopted keys") as tx:
            self._check_claim(tx, member)
            tx.many(_INSERT_ADOPTED, [(member, key, self.replica) for key in keys])

    def finish_drain(self, member: str) -> None:
        """Delete ``member``'s row and my claim on it, in one transaction; adopted keys stay.

        Raises a non-retriable CoordinationError when the claim is no longer mine.
        """
        with self._write("finish drain") as tx:
            self._check_claim(tx, member)
            tx.run(
                "DELETE FROM hm_replica_drains WHERE member = ? AND holder = ?",
                member,
                self.replica,
            )
            tx.run("DELETE FROM hm_replica_returns WHERE member = ?", member)
            # Only an expired row: while my claim existed the member could not rejoin, so this is
            # belt and braces against a row someone renewed by hand.
            tx.run(
                "DELETE FROM hm_replica_members WHERE replica = ? AND expires_at <= ?",
                member,
                self._clock(),
            )

    def adopted_keys(self) -> list[str]:
        """The keys others adopted from me (sorted), to load into my dedupe index on rejoin."""
        with self._read("read adopted keys") as tx:
            rows = tx.all(
                "SELECT dedupe_key FROM hm_replica_adopted WHERE member = ? ORDER BY dedupe_key",
                self.replica,
            )
        return [key for (key,) in rows]

    def adopted_among(self, member: str, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` some replica holding ``member``'s session recorded as adopted (it
        logged those messages): a redelivery of one of them to the next holder is not new."""
        if not keys:
            return set()
        with self._read("read adopted keys") as tx:
            rows = _rows_in(
                tx,
                "SELECT dedupe_key FROM hm_replica_adopted WHERE member = ? AND dedupe_key IN",
                keys,
                member,
            )
        return {key for (key,) in rows}

    def forget_adopted(self, keys: Sequence[str]) -> None:
        """Delete these adopted keys of mine (after my dedupe index holds them)."""
        if not keys:
            return
        with self._write("forget adopted keys") as tx:
            tx.many(
                "DELETE FROM hm_replica_adopted WHERE member = ? AND dedupe_key = ?",
                [(self.replica, key) for key in keys],
            )

    # -- subscriptions (VIN-sharded mode) -----------------------------------------------------

    def record_subscribed(self, replica: str, filters: Sequence[str]) -> None:
        """``replica``'s session holds these filters (after their SUBACK); no longer leaving."""
        if filters:
            with self._write("record subscriptions") as tx:
                tx.many(_INSERT_SUBSCRIPTION, [(replica, f) for f in filters])

    def forget_subscribed(self, replica: str, filters: Sequence[str]) -> None:
        """``replica``'s session no longer holds these filters (after their UNSUBACK)."""
        if filters:
            with self._write("forget subscriptions") as tx:
                tx.many(
                    "DELETE FROM hm_replica_subscriptions WHERE replica = ? AND topic_filter = ?",
                    [(replica, f) for f in filters],
                )

    def replace_subscribed(self, replica: str, old: Sequence[str], new: Sequence[str]) -> None:
        """In one transaction: ``replica``'s session no longer holds ``old`` but holds ``new``."""
        with self._write("replace subscriptions") as tx:
            tx.many(
                "DELETE FROM hm_replica_subscriptions WHERE replica = ? AND topic_filter = ?",
                [(replica, f) for f in old],
            )
            tx.many(_INSERT_SUBSCRIPTION, [(replica, f) for f in new])

    def mark_leaving(self, replica: str, filters: Sequence[str]) -> list[str]:
        """Of ``filters``, those ``replica``'s session may now UNSUBSCRIBE, marked as leaving.

        One may leave only while another session holds it and is not leaving it itself, checked
        and marked in one transaction: two sessions that both think a filter is no longer theirs
        (replicas disagreeing on the member list for a moment) cannot both drop it, which would
        leave its VIN with no subscriber. Forgotten with :meth:`forget_subscribed` after the
        UNSUBACK; a crash in between leaves it marked, and the next attempt goes on from there.
        """
        if not filters:
            return []
        leaving = []
        with self._write("mark subscriptions leaving") as tx:
            for topic_filter in filters:
                other = tx.one(
                    "SELECT 1 FROM hm_replica_subscriptions "
                    "WHERE topic_filter = ? AND replica <> ? AND leaving = 0",
                    topic_filter,
                    replica,
                )
                if other is not None:
                    tx.run(
                        "UPDATE hm_replica_subscriptions SET leaving = 1 "
                        "WHERE replica = ? AND topic_filter = ?",
                        replica,
                        topic_filter,
                    )
                    leaving.append(topic_filter)
        return leaving

    def subscribed(self, replica: str) -> set[str]:
        """The filters recorded for ``replica``'s session (leaving ones included)."""
        with self._read("read subscriptions") as tx:
            rows = tx.all(
                "SELECT topic_filter FROM hm_replica_subscriptions WHERE replica = ?", replica
            )
        return {f for (f,) in rows}

    def leaving(self, replica: str) -> set[str]:
        """The filters ``replica``'s session is leaving (marked, not yet forgotten)."""
        with self._read("read subscriptions") as tx:
            rows = tx.all(
                "SELECT topic_filter FROM hm_replica_subscriptions "
                "WHERE replica = ? AND leaving = 1",
                replica,
            )
        return {f for (f,) in rows}

    def subscriptions(self) -> dict[str, set[str]]:
        """Every recorded filter and the sessions holding it."""
        with self._read("read subscriptions") as tx:
            rows = tx.all("SELECT topic_filter, replica FROM hm_replica_subscriptions")
        held: dict[str, set[str]] = {}
        for topic_filter, replica in rows:
            held.setdefault(topic_filter, set()).add(replica)
        return held

    def subscriptions_starting(self, prefix: str) -> dict[str, set[str]]:
        """The recorded filters (or records) that start with ``prefix``, and who holds each."""
        # A range, not LIKE: "%" and "_" in the prefix would be wildcards.
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        with self._read("read subscriptions") as tx:
            rows = tx.all(
                "SELECT topic_filter, replica FROM hm_replica_subscriptions "
                "WHERE topic_filter >= ? AND topic_filter < ?",
                prefix,
                upper,
            )
        held: dict[str, set[str]] = {}
        for topic_filter, replica in rows:
            held.setdefault(topic_filter, set()).add(replica)
        return held

    def publish_members(self, members: Sequence[str], role: str = DEFAULT_ROLE) -> bool:
        """As the holder of ``role``, make ``members`` the group's member list; False (and no
        change) when I do not hold it."""
        with self._write("publish members") as tx:
            lease = tx.one(
                "SELECT 1 FROM hm_replica_leases WHERE role = ? AND holder = ? AND expires_at > ?",
                role,
                self.replica,
                self._clock(),
            )
            if lease is None:
                return False
            value = ",".join(members)
            lists = _member_lists(tx)
            if lists and lists[max(lists)] == list(members):
                return True
            # Each new list gets the next epoch, kept for good: a V2 envelope rule names the
            # epochs it judges by (ingest.replica.envelopes), and a backlog may hold old ones.
            epoch = max(lists, default=0) + 1
            if epoch == 2:  # the first list may predate epochs: keep it as 1
                tx.run(_UPSERT_SETTING, f"{_MEMBERS_AT}1", ",".join(lists[1]))
            tx.run(_UPSERT_SETTING, f"{_MEMBERS_AT}{epoch}", value)
            tx.run(_UPSERT_SETTING, "members", value)
            return True

    def published_members(self) -> list[str] | None:
        """The member list the leader published, or None before any was."""
        lists = self.member_lists()
        return lists[max(lists)] if lists else None

    def member_lists(self) -> dict[int, list[str]]:
        """Every member list the leader published, by epoch (1, 2, ...); the newest is in force."""
        with self._read("read members") as tx:
            return _member_lists(tx)

    def settled_times(self) -> dict[int, float]:
        """When the group settled after each member list (epoch → wall-clock seconds)."""
        with self._read("read settled lists") as tx:
            rows = tx.all(
                "SELECT name, value FROM hm_replica_settings WHERE name >= ? AND name < ?",
                _SETTLED_AT,
                _SETTLED_AT[:-1] + chr(ord(_SETTLED_AT[-1]) + 1),
            )
        return {int(str(name).removeprefix(_SETTLED_AT)): float(value) for name, value in rows}

    def mark_settled(self, epochs: Sequence[int]) -> None:
        """Record now as the time the group settled after these lists (kept if already set)."""
        if epochs:
            with self._write("mark lists settled") as tx:
                now = repr(self._clock())
                tx.many(
                    "INSERT INTO hm_replica_settings (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    [(f"{_SETTLED_AT}{epoch}", now) for epoch in epochs],
                )

    # -- handovers of VINs between sessions (VIN-sharded mode) --------------------------------

    def record_known(self, session: str, epoch: int) -> None:
        """``session``'s intake reads the stream by member lists up to ``epoch``."""
        with self._write("record known member list") as tx:
            tx.run(_UPSERT_KNOWN, session, epoch)

    def known_epochs(self) -> dict[str, int]:
        """Each session's newest member list its intake reads by (:meth:`record_known`)."""
        with self._read("read known member lists") as tx:
            rows = tx.all("SELECT session, epoch FROM hm_replica_known")
        return {str(session): int(epoch) for session, epoch in rows}

    def claim(self, member: str, keys: Sequence[str]) -> dict[str, str]:
        """Claim these message keys for ``member``'s session, in one transaction: each key's
        claimant (``member`` where it was first, or already was; another member otherwise)."""
        if not keys:
            return {}
        unique = sorted(set(keys))
        with self._write("claim messages") as tx:
            now = self._clock()
            tx.many(_INSERT_CLAIM, [(key, member, now) for key in unique])
            rows = _rows_in(
                tx, "SELECT claim_key, member FROM hm_replica_claims WHERE claim_key IN", unique
            )
        return dict(rows)

    def forget_claims(self) -> int:
        """Delete every claim (once no VIN is changing owner any more); how many there were."""
        with self._write("forget claims") as tx:
            return tx.run("DELETE FROM hm_replica_claims")

    # -- leader leases ------------------------------------------------------------------------

    def try_lead(self, role: str = DEFAULT_ROLE) -> bool:
        """Take ``role`` if free or expired, renew it if mine; True while I hold it."""
        with self._write("elect leader") as tx:
            now = self._clock()
            lease = tx.one("SELECT holder, expires_at FROM hm_replica_leases WHERE role = ?", role)
            if lease is not None and lease[0] != self.replica and lease[1] > now:
                return False
            tx.run(_UPSERT_LEASE, role, self.replica, now + self._lease_s)
            return True

    def resign(self, role: str = DEFAULT_ROLE) -> None:
        """Give ``role`` up now if I hold it, so another replica need not wait for the expiry."""
        with self._write("resign") as tx:
            tx.run(
                "DELETE FROM hm_replica_leases WHERE role = ? AND holder = ?", role, self.replica
            )

    def leader(self, role: str = DEFAULT_ROLE) -> str | None:
        """Who holds ``role`` (an unexpired lease), or None."""
        with self._read("read leader") as tx:
            row = tx.one(
                "SELECT holder FROM hm_replica_leases WHERE role = ? AND expires_at > ?",
                role,
                self._clock(),
            )
        return None if row is None else str(row[0])

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(*self._dialect.errors):
                    self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Coordinator(replica={self.replica!r}, url={self._url!r})"

    # -- plumbing -----------------------------------------------------------------------------

    def _renew_claim(self, tx: _Tx, member: str) -> bool:
        renewed = tx.run(
            "UPDATE hm_replica_drains SET expires_at = ? WHERE member = ? AND holder = ?",
            self._clock() + self._lease_s,
            member,
            self.replica,
        )
        return renewed == 1

    def _check_claim(self, tx: _Tx, member: str) -> None:
        holder = tx.one("SELECT holder FROM hm_replica_drains WHERE member = ?", member)
        if holder is None or holder[0] != self.replica:
            by = "nobody" if holder is None else repr(holder[0])
            raise CoordinationError(
                f"replica {self.replica!r} no longer holds the drain claim on {member!r} "
                f"(now held by {by}): stop draining it and acknowledge nothing more",
                retriable=False,
            )

    def _create_tables(self) -> None:
        # Under the write lock, so replicas starting together do not race CREATE TABLE (which
        # PostgreSQL does not make atomic even with IF NOT EXISTS).
        with self._write("create tables") as tx:
            for statement in _SCHEMA:
                tx.run(statement)

    def _connection(self) -> Any:
        if self._closed:
            raise CoordinationError(
                f"coordinator for replica {self.replica!r} is closed", retriable=False
            )
        # Reconnect here, so the first call after a database outage or restart works again.
        if self._conn is None or self._dialect.is_lost(self._conn):
            self._conn = self._connect()
        return self._conn

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[_Tx]:
        """One write transaction, serialised against every other writer on the database."""
        with self._lock, self._translate(what):
            conn = self._connection()
            cursor = conn.cursor()
            tx = _Tx(cursor, self._dialect.placeholder)
            tx.run(self._dialect.begin)
            try:
                if self._dialect.lock is not None:
                    tx.run(self._dialect.lock)
                yield tx
                tx.run("COMMIT")
            except BaseException:
                # Also after a failed COMMIT, so the connection is never left inside a transaction.
                with contextlib.suppress(*self._dialect.errors):
                    cursor.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[_Tx]:
        # A single SELECT in autocommit mode is its own consistent snapshot on both databases.
        with self._lock, self._translate(what):
            yield _Tx(self._connection().cursor(), self._dialect.placeholder)

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._dialect.errors as exc:
            transient = isinstance(exc, self._dialect.transient)
            hint = (
                "retried on the next heartbeat"
                if transient
                else "check the database and its permissions"
            )
            raise CoordinationError(
                f"coordination database {self._url}: could not {what} for replica "
                f"{self.replica!r}: {_one_line(exc)}; {hint}",
                retriable=transient,
            ) from exc


class _Tx:
    """A cursor inside a transaction, taking ``?`` marks whatever the driver's style."""

    def __init__(self, cursor: Any, placeholder: str) -> None:
        # Any: sqlite3 and psycopg cursors share this duck-typed surface but no common type.
        self._cursor = cursor
        self._placeholder = placeholder

    def _sql(self, sql: str) -> str:
        # The statements in this module contain no "?" or "%" other than parameter marks.
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)

    def run(self, sql: str, *params: object) -> int:
        """Execute; the number of rows changed."""
        self._cursor.execute(self._sql(sql), params)
        return int(self._cursor.rowcount)

    def one(self, sql: str, *params: object) -> tuple[Any, ...] | None:
        self._cursor.execute(self._sql(sql), params)
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        self._cursor.execute(self._sql(sql), params)
        return [tuple(row) for row in self._cursor.fetchall()]

    def many(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        self._cursor.executemany(self._sql(sql), rows)


def _sqlite(url: str) -> tuple[_Dialect, Callable[[], sqlite3.Connection]]:
    path = sqlite_path(url)
    if not path.parent.is_dir():
        raise ConfigError(
            f"replica.coordination = {url!r}: folder {path.parent} does not exist; create it "
            "(on replicas sharing one host: a volume every replica mounts at the same path)",
            key=_CONFIG_KEY,
        )

    def connect() -> sqlite3.Connection:
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE ... COMMIT.
        # timeout: SQLite's busy timeout, how long BEGIN IMMEDIATE waits for another writer.
        db = sqlite3.connect(
            path, timeout=_LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            # WAL: readers (members, leader) never wait for the writer. FULL: a committed
            # record_adopted is on disk before the drain acknowledges those messages.
            _enable_wal(db)
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    dialect = _Dialect(
        name="sqlite",
        begin="BEGIN IMMEDIATE",
        lock=None,
        placeholder="?",
        # OperationalError: "database is locked" (busy timeout), I/O errors, a full disk.
        transient=(sqlite3.OperationalError,),
        errors=(sqlite3.Error,),
        is_lost=lambda _conn: False,  # a file does not go away like a server
    )
    return dialect, connect


def _enable_wal(db: sqlite3.Connection) -> None:
    # Switching a new file to WAL answers "database is locked" at once, without waiting for the
    # busy timeout, while another replica opening it at the same moment does the same; so wait
    # here. Once the file is in WAL mode (it stays so) the pragma no longer needs that lock.
    deadline = time.monotonic() + _LOCK_TIMEOUT_S
    while True:
        try:
            (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
            continue
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(
                f"the file cannot use the WAL journal (journal mode stays {mode!r})"
            )
        return


def _postgresql(url: str, replica: str) -> tuple[_Dialect, Callable[[], Any]]:
    try:
        import psycopg  # noqa: PLC0415 -- optional dependency, only for PostgreSQL URLs
        from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"replica.coordination = {redact_url(url)!r} needs psycopg 3, which is not "
            "installed; install it with: pip install 'hm-fleet-ingest[postgres]'",
            key=_CONFIG_KEY,
        ) from exc

    try:
        given = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ConfigError(
            f"replica.coordination = {redact_url(url)!r} is not a valid PostgreSQL URL "
            f"({_one_line(exc)}); use postgresql://user[:password]@host[:port]/database",
            key=_CONFIG_KEY,
        ) from exc
    # The replica's name shows in pg_stat_activity, so an operator sees who holds what.
    defaults = {**_LIBPQ_DEFAULTS, "application_name": f"hm-ingest {replica}"[:63]}
    conninfo = make_conninfo(url, **{k: v for k, v in defaults.items() if k not in given})

    def connect() -> psycopg.Connection[Any]:
        # autocommit: transactions are the explicit BEGIN ... COMMIT, as on SQLite.
        conn = psycopg.connect(conninfo, autocommit=True)
        try:
            conn.execute(f"SET lock_timeout = {int(_LOCK_TIMEOUT_S * 1000)}")
            conn.execute(f"SET statement_timeout = {_STATEMENT_TIMEOUT_S * 1000}")
            conn.execute(f"SET idle_in_transaction_session_timeout = {_IDLE_IN_TRANSACTION_S}000")
        except BaseException:
            conn.close()
            raise
        return conn

    dialect = _Dialect(
        name="postgresql",
        begin="BEGIN",
        # Every write transaction takes this lock first, so check-and-set sequences run one at a
        # time exactly as under SQLite's single writer; it is released at COMMIT or ROLLBACK.
        lock=f"SELECT pg_advisory_xact_lock({_ADVISORY_CLASS}, "
        "hashtext(coalesce(current_schema(), '')))",
        placeholder="%s",
        # OperationalError covers a lost connection, lock_timeout, serialisation failures.
        transient=(psycopg.OperationalError,),
        errors=(psycopg.Error,),
        # closed is also true once the server or the network dropped the connection.
        is_lost=lambda conn: bool(conn.closed),
    )
    return dialect, connect


def _fix_hint(dialect: str) -> str:
    if dialect == "sqlite":
        return "check that the file is writable by this user and not on a network filesystem"
    return (
        "check that the server is running and reachable, the user, password and database are "
        "right, and the user may create tables in the schema (search_path)"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
