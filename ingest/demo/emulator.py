"""``hm-ingest emulator`` (REST API and vehicle stream) as the demo's child process.

The emulator prints one JSON line with its URLs and credentials on stdout; the demo sends stdout
to ``emulator.json`` and the log to ``emulator.log`` (files, not pipes: nothing can fill up and
block it). It runs in its own session so a Ctrl-C in the terminal reaches only the demo, which
then still reads the stream's final counters before stopping it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import CertBundle

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 5.0


class EmulatorError(Exception):
    """The emulator did not start or stopped answering; the message holds its log tail."""


class EmulatorProcess:
    def __init__(self, out: Path) -> None:
        self.info_path = out / "emulator.json"
        self.log_path = out / "emulator.log"
        self.state_dir = out / "emulator"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(
        self,
        broker: MosquittoBroker,
        certs: CertBundle,
        *,
        app_id: str,
        webhook_url: str,
        vehicle_rate: float,
        bad_rate: float,
        malformed_rate: float,
        seed: int,
        decision_delay_s: float,
    ) -> dict[str, Any]:
        """Start paused (nothing is published before the daemon holds its session); the JSON."""
        return self.launch([
            "--webhook-url", webhook_url,
            "--decision-delay-s", str(decision_delay_s),
            "--mqtt-broker", f"{broker.host}:{broker.port}",
            "--mqtt-ca", str(certs.ca_file),
            "--mqtt-cert", str(certs.client_cert),
            "--mqtt-key", str(certs.client_key),
            "--mqtt-client-id", "hm-demo-vehicle-stream",
            "--app-id", app_id,
            "--stream-format", "both",
            "--stream-vehicle-rate", str(vehicle_rate),
            "--bad-rate", str(bad_rate),
            "--malformed-rate", str(malformed_rate),
            "--stream-seed", str(seed),
            "--stream-paused",
        ])  # fmt: skip

    def launch(self, arguments: list[str]) -> dict[str, Any]:
        """Start ``hm-ingest emulator`` on a loopback port with ``arguments``; its JSON line."""
        argv = [
            sys.executable, "-m", "ingest.cli", "emulator",
            "--api-listen", "127.0.0.1:0",
            "--state-dir", str(self.state_dir),
            *arguments,
        ]  # fmt: skip
        self.info_path.parent.mkdir(parents=True, exist_ok=True)
        with self.info_path.open("wb") as stdout, self.log_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                argv,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("HM_INGEST_")},
                start_new_session=True,
            )
        self.info = self._read_info()
        return self.info

    def _read_info(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.info_path.read_text(encoding="utf-8")
            if text.endswith("\n"):
                return dict(json.loads(text.splitlines()[0]))
            if self.proc is not None and self.proc.poll() is not None:
                raise EmulatorError(
                    f"the emulator exited at start-up (code {self.proc.returncode}):\n"
                    + self.log_tail()
                )
            time.sleep(0.05)
        raise EmulatorError(
            f"the emulator printed nothing within {START_TIMEOUT_S:g} s:\n" + self.log_tail()
        )

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- admin endpoints ----------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        url = f"{self.info['admin_url']}{path}"
        try:
            response = httpx.request(method, url, json=body, timeout=HTTP_TIMEOUT_S)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise EmulatorError(f"{method} {url} failed: {exc}\n{self.log_tail()}") from exc
        return response.json()

    def set_paused(self, paused: bool) -> None:
        self._admin("PUT", "/stream", {"paused": paused})

    def stream(self) -> dict[str, Any]:
        return dict(self._admin("GET", "/stream"))

    def clearances(self) -> dict[str, str]:
        """VIN → clearance status, as the emulator (HM's side) holds it."""
        state = self._admin("GET", "/state")
        return {v["vin"]: v["status"] for v in state["vehicles"]}

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        return proc.returncode
