"""A real Mosquitto for tests and local runs: mutual TLS, persistence, raised queue limits.

``MosquittoBroker`` writes its own ``mosquitto.conf`` into a folder it is given, runs
``mosquitto -c`` as a child process and waits until the TLS port accepts TCP. It never touches the
system broker (port 1883): each instance takes a free loopback port and keeps it across
``restart()``, so a client reconnecting to the same address finds its persistent session again.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from ingest.testing.certs import CertBundle

HOST = "127.0.0.1"
# Mosquitto's default drops messages for an offline persistent session past 1000 queued, without
# telling anyone (hm-reference.md section 6). A test broker must not lose data the real one keeps.
DEFAULT_MAX_QUEUED_MESSAGES = 1_000_000
# Mosquitto's own default, kept so tests meet the same window as production brokers.
DEFAULT_MAX_INFLIGHT_MESSAGES = 20
# Short so a SIGKILL loses at most a second of broker state; costs one small write a second.
DEFAULT_AUTOSAVE_INTERVAL_S = 1
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.02

INSTALL_HINT = (
    "mosquitto is not on PATH; install it with `apt-get install -y mosquitto` (Debian/Ubuntu) "
    "or `brew install mosquitto` (macOS)"
)


class BrokerStartError(RuntimeError):
    """Mosquitto is missing, exited at start-up or did not open its port in time."""


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary; Debian installs it in /usr/sbin, often not on PATH."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerStartError(INSTALL_HINT)
    return found


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the kernel picks it; a small race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One Mosquitto process with a mutual-TLS listener (and optionally a plain one)."""

    def __init__(
        self,
        directory: Path,
        certs: CertBundle,
        *,
        plain_listener: bool = False,
        persistence: bool = True,
        autosave_interval_s: int = DEFAULT_AUTOSAVE_INTERVAL_S,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        max_inflight_messages: int = DEFAULT_MAX_INFLIGHT_MESSAGES,
        server_cert: Path | None = None,
        server_key: Path | None = None,
    ) -> None:
        self._dir = directory
        self._certs = certs
        self._persistence = persistence
        self._autosave_interval_s = autosave_interval_s
        self._max_queued = max_queued_messages
        self._max_inflight = max_inflight_messages
        self._server_cert = server_cert or certs.server_cert
        self._server_key = server_key or certs.server_key
        self._port = free_port()
        self._plain_port = free_port() if plain_listener else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir.mkdir(parents=True, exist_ok=True)

    # -- properties -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The mutual-TLS port."""
        return self._port

    @property
    def plain_port(self) -> int | None:
        """The plain-TCP anonymous port, or None when not configured."""
        return self._plain_port

    @property
    def ca_file(self) -> Path:
        """The CA that signed the broker's certificate (what a client's ``ca_file`` should be)."""
        return self._certs.ca_file

    @property
    def certs(self) -> CertBundle:
        return self._certs

    @property
    def conf_path(self) -> Path:
        return self._dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- configuration ----------------------------------------------------------------------

    def _config(self) -> str:
        lines = [
            "# Written by ingest.testing.broker for one test run; not a production config.",
            # Security settings (allow_anonymous) apply per listener below.
            "per_listener_settings true",
            # Running as root, Mosquitto would switch to user 'mosquitto', which cannot read
            # this folder; naming the current user keeps it as is (ignored when not root).
            f"user {getpass.getuser()}",
            f"persistence {'true' if self._persistence else 'false'}",
            f"persistence_location {self._dir}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {self._autosave_interval_s}",
            f"max_queued_messages {self._max_queued}",
            f"max_inflight_messages {self._max_inflight}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "",
            f"listener {self._port} {HOST}",
            "allow_anonymous false",
            f"cafile {self._certs.ca_file}",
            f"certfile {self._server_cert}",
            f"keyfile {self._server_key}",
            "require_certificate true",
            # The certificate CN becomes the username: the broker knows who connected.
            "use_identity_as_username true",
            # Minimum version in Mosquitto 2.x; 1.3 is still offered.
            "tls_version tlsv1.2",
        ]
        if self._plain_port is not None:
            lines += ["", f"listener {self._plain_port} {HOST}", "allow_anonymous true"]
        return "\n".join(lines) + "\n"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            raise BrokerStartError(f"broker already running (pid {self.pid})")
        binary = find_mosquitto()
        self.conf_path.write_text(self._config())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = subprocess.Popen(
            [binary, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Its own session, so a terminal's Ctrl-C (SIGINT to the foreground process group)
            # does not reach it: whoever started it stops it (stop()/kill() signal its PID), after
            # its clients have drained. Otherwise the daemon would lose its broker mid-drain.
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        ports = [self._port] + ([self._plain_port] if self._plain_port is not None else [])
        while not all(port_accepts(HOST, p) for p in ports):
            if self._proc.poll() is not None:
                raise BrokerStartError(self._failure("exited at start-up", log_offset))
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerStartError(
                    self._failure(
                        f"did not accept TCP on {HOST}:{ports} within {START_TIMEOUT_S} s",
                        log_offset,
                    )
                )
            time.sleep(POLL_INTERVAL_S)

    def _failure(self, what: str, log_offset: int) -> str:
        stderr = b""
        if self._proc is not None and self._proc.poll() is not None and self._proc.stderr:
            stderr = self._proc.stderr.read()
        log = ""
        if self.log_path.exists():
            with self.log_path.open("rb") as f:
                f.seek(log_offset)
                log = f.read().decode(errors="replace")
        return (
            f"mosquitto ({self.conf_path}) {what}\nstderr: {stderr.decode(errors='replace')}"
            f"\nlog:\n{log}"
        )

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        if proc.stderr is not None:
            proc.stderr.close()
        self._proc = None

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file and exits cleanly."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; only state saved by the last autosave survives."""
        self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same persistence file."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
