"""Configuration and process helpers for running the real daemon against a test broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from ingest.testing.broker import MosquittoBroker, free_port
from ingest.testing.certs import CertBundle

APP_ID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"


def daemon_config(
    broker: MosquittoBroker,
    certs: CertBundle,
    workdir: Path,
    *,
    client_id: str = "hm-ingest-test",
    app_id: str = APP_ID,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Settings (as the TOML tree) for a daemon on ``broker`` writing under ``workdir``."""
    tree: dict[str, dict[str, Any]] = {
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "client_id": client_id,
            "app_id": app_id,
            "ca_file": str(certs.ca_file),
            "cert_file": str(certs.client_cert),
            "key_file": str(certs.client_key),
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
        },
        "output": {"path": str(workdir / "data"), "flush_age_s": 0.5},
        "state": {"path": str(workdir / "state")},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "shutdown": {"deadline_s": 20.0},
        # The thread, not "auto": a sink process adds about a second of interpreter start-up to
        # every daemon start, and the tests start hundreds. The sink is the same class either
        # way; tests/test_sink_process.py and the crash and gate tests run the process too.
        "ingest": {"sink": "thread"},
    }
    for section, values in (overrides or {}).items():
        tree.setdefault(section, {}).update(values)
    return tree


def write_toml(tree: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Write a two-level settings tree as TOML (strings, numbers and booleans only)."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list | tuple):
            return "[" + ", ".join(literal(item) for item in value) + "]"
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'

    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {literal(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class DaemonProcess:
    """``hm-ingest run`` as a child process, for kill -9 and signal tests."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra_env: Mapping[str, str] | None = None) -> None:
        """Start it; ``extra_env`` adds variables (fault points) for this start only."""
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HM_INGEST_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env | dict(extra_env or {}),
            # Its own session, so a terminal's Ctrl-C reaches only whoever started it (the demo,
            # a test), which then stops it by PID, in order: the daemon drains while the broker
            # is still up.
            start_new_session=True,
        )
        log.close()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_ready(tree: Mapping[str, Mapping[str, Any]], timeout_s: float = 30.0) -> None:
    """Wait until the daemon configured by ``tree`` answers 200 on ``/readyz`` (subscribed)."""
    url = f"http://{tree['metrics']['listen']}/readyz"

    def ready() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout_s, f"{url} to answer 200")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)
