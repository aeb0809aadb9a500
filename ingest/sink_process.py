"""The sink in a process of its own (``[ingest] sink = "process"``).

Why: with the receive path cheap, the sink (decode, dedupe, Parquet) is most of the daemon's
Python work, and on a thread it shares one GIL with receive and intake, so the daemon uses about
one core however many it has. In its own process it runs on another core.

What stays the same: the daemon's process owns the log and every acknowledgement (intake logs a
group, acknowledges it, then hands it over); the sink process runs the same :class:`Sink` with the
same commit protocol on the same state; log segments are released only after the sink reports the
commit. So the durability argument of :mod:`ingest.sink` holds unchanged; only the hand-over
crosses a process boundary, and a group lost in that pipe is still in the log.

Messages, pickled over two one-way pipes (each in order)::

    daemon → sink     ("records", first_lsn, entries)   logged groups run together (HANDOVER_S),
                                                         as Sink.submit takes one
                      ("refused", frozenset of VINs)     clearance gate, sent when it changes
                      ("stop",)                          commit what is pending, then exit
    sink → daemon     ("ready", committed_lsn)           state opened; takes records from here
                      ("took", n)                        n records left the queue (backpressure)
                      ("committed", CommitReport)        release the log, count the batch
                      ("flush_failed",)                  a commit attempt failed; retried
                      ("status", heartbeat_age_s, last_error, oldest_uncommitted_s)
                      ("failed", message)                the sink stopped on an error
                      ("stopped", committed_lsn)         stopped as asked

Crashes: a sink process that exits unasked (killed, out of memory) stops the daemon with an error
(exit 1), and the restart replays what was not committed. A sink process whose daemon is gone
(its pipe reads EOF) exits at once without committing. ``state/sink.lock`` keeps the two from
overlapping across a restart: the daemon holds it while it replays, the sink process from then
until it exits, so a restarted daemon waits for an orphaned sink process to be gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, Self

import pyarrow as pa

from ingest import gc_tuning
from ingest.batch import Clearances
from ingest.config import Settings
from ingest.errors import IngestError, LogError, SinkError
from ingest.logs import configure
from ingest.sink import CommitReport, SinkEvents

log = logging.getLogger("ingest.sink_process")

LOCK_NAME = "sink.lock"
# A restarted daemon waits this long for a previous run's sink process to exit (it exits within
# milliseconds of its daemon; longer means another daemon uses the same state folder).
LOCK_TIMEOUT_S = 10.0
LOCK_POLL_S = 0.05
# Start-up of the sink process: interpreter, imports (pyarrow), state, the Iceberg catalog.
READY_TIMEOUT_S = 120.0
# How often the sink process reports its heartbeat, last error and oldest uncommitted record.
STATUS_S = 0.5
# After a stop was sent: the sink commits what is pending, which the shutdown deadline bounds.
JOIN_S = 5.0
# Logged groups are sent on together: when this many records wait, or HANDOVER_S after the first
# of them (by the relay thread). At a few thousand messages a second intake logs a group of a few
# messages per fsync; one message per group cost a pickle and a pipe write on intake's thread and
# a wake-up of the sink process's reader. Acks do not wait for this: they left at logging.
HANDOVER_RECORDS = 4096
HANDOVER_S = 0.02
# Exit code of a sink process whose daemon went away: not an error of its own.
EXIT_ORPHANED = 3


class SinkLock:
    """An exclusive ``flock`` on ``<state>/sink.lock``: whoever commits to this state holds it."""

    def __init__(self, path: Path, handle: IO[bytes]) -> None:
        self.path = path
        self._handle: IO[bytes] | None = handle

    @classmethod
    def acquire(cls, state_dir: Path, *, timeout_s: float | None = LOCK_TIMEOUT_S) -> Self:
        """Take the lock, waiting up to ``timeout_s`` (None: as long as it takes)."""
        path = state_dir / LOCK_NAME
        try:
            handle = path.open("ab")
        except OSError as exc:
            raise LogError(f"cannot open {path}: {exc}") from exc
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    handle.close()
                    raise LogError(
                        f"the state folder {state_dir} is in use: another process holds "
                        f"{path} (a second daemon configured with the same [state] path, or a "
                        f"sink process that outlived its daemon by more than {timeout_s:g} s); "
                        "give every daemon its own state folder, or stop the other process",
                        retriable=False,
                    ) from None
                time.sleep(LOCK_POLL_S)
                continue
            return cls(path, handle)

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


class SinkProcess:
    """The daemon's side of a sink process: what :class:`ingest.sink.Sink` offers intake and the
    daemon (``submit``, ``run``, ``committed_lsn``, ...), served by the process."""

    def __init__(
        self, process: subprocess.Popen[bytes], inbox: Connection, outbox: Connection
    ) -> None:
        self._process = process
        self._inbox = inbox  # we write; the sink process reads
        self._outbox = outbox  # the sink process writes; we read
        self._send_lock = threading.Lock()
        # Groups logged and not sent yet (first lsn, entries), under _send_lock; see HANDOVER_S.
        self._held: list[tuple[int, list[tuple[int, str, bytes]]]] = []
        self._held_records = 0
        self._events: SinkEvents | None = None
        self._clearances: Clearances | None = None
        self._refused_sent: frozenset[str] | None = None
        self._clearance_lock = threading.Lock()
        self._sent_records = 0
        self._taken_records = 0
        self.committed_lsn = 0
        self.heartbeat = time.monotonic()
        self.last_error: str | None = None

    @classmethod
    def start(cls, settings: Settings) -> SinkProcess:
        """Start the process. It waits for ``sink.lock``, which the caller holds until its own
        replay is committed, then opens the state and reports ready (:meth:`wait_ready`)."""
        # A fresh interpreter running this module, not multiprocessing: fork would copy a
        # process with threads (and locks they hold), and spawn imports the daemon's __main__
        # (the whole CLI) again, plus a resource-tracker process. Pipes carry
        # multiprocessing.connection messages all the same.
        inbox_read, inbox_write = os.pipe()
        outbox_read, outbox_write = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(inbox_read), str(outbox_write)],
                pass_fds=(inbox_read, outbox_write),
            )
        except BaseException:
            os.close(inbox_write)
            os.close(outbox_read)
            raise
        finally:
            # Only the child uses these ends now: closing ours makes its exit an EOF for us.
            os.close(inbox_read)
            os.close(outbox_write)
        inbox = Connection(inbox_write, readable=False)
        inbox.send(settings)
        return cls(process, inbox, Connection(outbox_read, writable=False))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def wait_ready(self, committed_lsn: int, events: SinkEvents) -> None:
        """Wait until the process serves from ``committed_lsn``; ``events`` get its reports."""
        self._events = events
        if not self._outbox.poll(READY_TIMEOUT_S):
            raise SinkError(
                f"the sink process did not start within {READY_TIMEOUT_S:g} s", retriable=False
            )
        message = self._receive()
        if message[0] == "failed":
            raise SinkError(f"the sink process could not start: {message[1]}", retriable=False)
        if message != ("ready", committed_lsn):
            raise SinkError(
                f"the sink process opened the state at {message!r}, expected committed lsn "
                f"{committed_lsn}: another process changed the checkpoint meanwhile",
                retriable=False,
            )
        self.committed_lsn = committed_lsn
        self.heartbeat = time.monotonic()

    # -- intake thread ----------------------------------------------------------------------
    def submit(self, first_lsn: int, entries: list[tuple[int, str, bytes]]) -> None:
        # The gate first, so the records after a clearance change are judged by the new state.
        self._follow_clearances()
        with self._send_lock:
            if self._held_records + len(entries) > HANDOVER_RECORDS:
                self._send_held()  # one message of at most HANDOVER_RECORDS, or one group
            self._held.append((first_lsn, entries))
            self._held_records += len(entries)
            self._sent_records += len(entries)
            if self._held_records >= HANDOVER_RECORDS:
                self._send_held()

    @property
    def queued_records(self) -> int:
        """Records handed over and not yet taken by the sink: intake pauses when too many wait."""
        return self._sent_records - self._taken_records

    # -- daemon -----------------------------------------------------------------------------
    def set_clearances(self, clearances: Clearances | None) -> None:
        self._clearances = clearances
        self._follow_clearances()

    def _follow_clearances(self) -> None:
        clearances = self._clearances
        if clearances is None:
            return
        # Read, compared and sent under one lock: intake's thread and the relay both call this,
        # and an older snapshot must not overtake a newer one in the pipe.
        with self._clearance_lock:
            refused = clearances.refused_vins
            if refused is self._refused_sent or refused == self._refused_sent:
                return
            self._send(("refused", refused))
            self._refused_sent = refused

    def _send(self, message: tuple[Any, ...]) -> None:
        """Send to the process after the held records (intake's thread and the relay's both
        do); SinkError if it is gone."""
        with self._send_lock:
            self._send_held()
            self._send_now(message)

    def _send_held(self) -> None:
        """Send the held groups as one ("records", ...) message; under _send_lock."""
        held = self._held
        if not held:
            return
        first_lsn, entries = held[0]
        if len(held) > 1:
            entries = [entry for _, group in held for entry in group]
        self._held = []
        self._held_records = 0
        self._send_now(("records", first_lsn, entries))

    def _send_now(self, message: tuple[Any, ...]) -> None:
        try:
            self._inbox.send(message)
        except OSError:  # BrokenPipeError: it exited
            raise self._exited() from None

    def run(self, stop: threading.Event) -> None:
        """Relay the process's reports until ``stop`` is set and it has committed and exited.

        Raises SinkError when the process fails or exits unasked.
        """
        events = self._events
        assert events is not None, "wait_ready() first"
        stop_sent = False
        while True:
            if stop.is_set() and not stop_sent:
                self._send(("stop",))
                stop_sent = True
            reported = self._outbox.poll(HANDOVER_S)
            with self._send_lock:
                self._send_held()
            if not reported:
                self._follow_clearances()
                continue
            message = self._receive()
            kind = message[0]
            if kind == "took":
                self._taken_records += message[1]
            elif kind == "committed":
                report: CommitReport = message[1]
                self.committed_lsn = report.last_lsn
                events.committed(report)
            elif kind == "status":
                _, age_s, self.last_error, oldest_s = message
                self.heartbeat = time.monotonic() - age_s
                events.oldest_uncommitted(oldest_s)
            elif kind == "flush_failed":
                events.flush_failed()
            elif kind == "failed":
                raise SinkError(f"the sink process stopped: {message[1]}", retriable=False)
            elif kind == "stopped":
                self.committed_lsn = message[1]
                # Everything is committed: one that does not exit in time is killed by close().
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(JOIN_S)
                return
            else:
                raise SinkError(f"the sink process sent {message!r}", retriable=False)

    def _receive(self) -> Any:
        try:
            return self._outbox.recv()
        except (EOFError, OSError):
            raise self._exited() from None

    def _exited(self) -> SinkError:
        try:
            code: int | str = self._process.wait(JOIN_S)
        except subprocess.TimeoutExpired:
            code = "none yet: its pipe is closed but it still runs"
        return SinkError(
            f"the sink process exited unexpectedly (exit code {code}); what it had not "
            "committed is in the log and replayed at the next start",
            retriable=False,
        )

    def close(self) -> None:
        """End the process if it still runs (after a failed start or a missed deadline)."""
        if self._process.poll() is None:
            self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(JOIN_S)
        self._inbox.close()
        self._outbox.close()


# -- the sink process -------------------------------------------------------------------------


class _RefusedVins:
    """The clearance gate in the sink process: the refused VINs the daemon sent last. Not the
    daemon's ClearanceStateStore: ingest.fleet brings the HM API client (httpx, jwt,
    cryptography), about 20 MB this process never uses."""

    def __init__(self) -> None:
        self.refused_vins: frozenset[str] = frozenset()


class _Reports:
    """:class:`SinkEvents` in the sink process: each event becomes a message to the daemon."""

    def __init__(self, outbox: Connection) -> None:
        self._outbox = outbox
        self._lock = threading.Lock()  # the sink, status and main threads all send
        self.oldest_uncommitted_s = 0.0

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._outbox.send(message)

    def committed(self, report: CommitReport) -> None:
        self.send(("committed", report))

    def flush_failed(self) -> None:
        self.send(("flush_failed",))

    def took_records(self, count: int) -> None:
        self.send(("took", count))

    def oldest_uncommitted(self, age_s: float) -> None:
        self.oldest_uncommitted_s = age_s  # sent with the next status: the sink sets it often


def serve(inbox: Connection, outbox: Connection) -> None:
    """The sink process's main function: settings first, then as the module docstring says."""
    settings: Settings = inbox.recv()
    # Ctrl-C reaches the whole process group; the daemon decides when the sink stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure(settings.logging.level, settings.logging.format)
    # As in the daemon (ingest.cli): the C library's allocator returns freed Arrow buffers,
    # pyarrow's default keeps them resident.
    pa.set_memory_pool(pa.system_memory_pool())
    # Imported here: the daemon's process imports this module, and ingest.pipeline imports it.
    from ingest.pipeline import open_sink  # noqa: PLC0415

    lock = SinkLock.acquire(settings.state.path, timeout_s=None)
    if inbox.poll():  # the daemon sends nothing before "ready": this is its end closing
        _exit_orphaned()
    reports = _Reports(outbox)
    try:
        opened = open_sink(settings, reports)
        # The daemon replayed and committed everything logged, so nothing is left to replay;
        # this sets committed_lsn and checks that no batch is pending.
        opened.sink.replay(opened.checkpoint, ())
    except Exception as exc:  # reported, so the daemon's start-up error names it
        log.exception("the sink process could not start")
        reports.send(("failed", str(exc)))
        raise SystemExit(1) from None
    sink = opened.sink
    checkpoint = opened.checkpoint
    gc_tuning.tune()  # everything is imported and opened: see ingest.gc_tuning
    gate = _RefusedVins()
    sink.set_clearances(gate)
    stop = threading.Event()
    reports.send(("ready", checkpoint.committed_lsn))

    def read() -> None:
        while True:
            try:
                message = inbox.recv()
            except (EOFError, OSError):
                _exit_orphaned()
            kind = message[0]
            if kind == "records":
                sink.submit(message[1], message[2])
            elif kind == "refused":
                gate.refused_vins = message[1]
            elif kind == "stop":
                stop.set()
                return
            else:
                log.error("unknown message from the daemon: %r", kind)

    def report_status() -> None:
        while not stop.wait(STATUS_S):
            reports.send(
                (
                    "status",
                    time.monotonic() - sink.heartbeat,
                    sink.last_error,
                    reports.oldest_uncommitted_s,
                )
            )

    threading.Thread(target=read, name="sink-inbox", daemon=True).start()
    threading.Thread(target=report_status, name="sink-status", daemon=True).start()
    try:
        sink.run(stop)
    except IngestError as exc:
        log.exception("the sink stops")
        reports.send(("failed", str(exc)))
        raise SystemExit(1) from None
    finally:
        stop.set()
    reports.send(("stopped", sink.committed_lsn))
    opened.close()
    lock.release()


def _exit_orphaned() -> None:
    # At once, not through a commit: the daemon is gone, and what is not committed is in its log
    # for the next start. os._exit: the sink thread may be mid-commit, which is a crash the
    # commit protocol recovers from, and no cleanup may race a restarted daemon.
    log.warning("the daemon is gone: the sink process exits without committing")
    os._exit(EXIT_ORPHANED)


if __name__ == "__main__":
    # python -m ingest.sink_process <inbox fd> <outbox fd>, as SinkProcess.start runs it.
    serve(
        Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    )
