"""The HM emulator's REST side as a child process, and the fleet file a daemon reads, for tests.

VIN-sharded replicas (``[replica] mode = "vin"``) take the VINs they subscribe from their
clearance state and the fleet file, so a test of them needs HM's fleet API: this runs
``hm-ingest emulator`` (no vehicle stream; the test publishes itself) over real HTTP with a short
decision delay and every VIN approved, and writes the fleet file the leader adds VINs from. VINs
reach HM the real way: the fleet file, then the leader's adds.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 10.0
# A brand HM's fleet API accepts for any VIN (the emulator's catalogue).
FLEET_BRAND = "sandbox"


class FleetEmulatorError(Exception):
    """The emulator did not start or stopped answering; the message holds its log tail."""


class FleetEmulator:
    """``hm-ingest emulator`` on a loopback port; its state, JSON line and log under ``folder``."""

    def __init__(self, folder: Path, *, decision_delay_s: float = 0.5) -> None:
        self.folder = folder
        self.decision_delay_s = decision_delay_s
        self.info_path = folder / "emulator.json"
        self.log_path = folder / "emulator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self) -> dict[str, Any]:
        """Start it and return its start-up JSON (URLs and credentials)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "ingest.cli", "emulator",
            "--api-listen", "127.0.0.1:0",
            "--state-dir", str(self.folder / "state"),
            "--decision-delay-s", str(self.decision_delay_s),
            # The test VINs (ingest.testing.traffic.make_vin) end in any letter; the default rule
            # rejects those ending in R, and a rejected VIN is not what these tests are about.
            "--outcome", "*=approved",
        ]  # fmt: skip
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

    def api_settings(self) -> dict[str, Any]:
        """The daemon's ``[api]`` section for this emulator."""
        return {
            "base_url": self.info["base_url"],
            "client_id": self.info["client_id"],
            "client_secret": self.info["client_secret"],
            "auth": "client_credentials",
        }

    def statuses(self) -> dict[str, str]:
        """VIN → clearance status as HM's side holds it."""
        url = f"{self.info['admin_url']}/state"
        try:
            response = httpx.get(url, timeout=HTTP_TIMEOUT_S)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise FleetEmulatorError(f"GET {url} failed: {exc}\n{self.log_tail()}") from exc
        return {v["vin"]: v["status"] for v in response.json()["vehicles"]}

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

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

    def _read_info(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.info_path.read_text(encoding="utf-8")
            if text.endswith("\n"):
                return dict(json.loads(text.splitlines()[0]))
            if self.proc is not None and self.proc.poll() is not None:
                raise FleetEmulatorError(
                    f"the emulator exited at start-up (code {self.proc.returncode}):\n"
                    + self.log_tail()
                )
            time.sleep(0.05)
        raise FleetEmulatorError(
            f"the emulator printed nothing within {START_TIMEOUT_S:g} s:\n" + self.log_tail()
        )


def write_fleet_file(path: Path, vins: Iterable[str]) -> Path:
    """Write the desired fleet (CSV) atomically: the daemon re-reads it every cycle and must
    never see half a file."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["vin", "brand"])
        writer.writerows([vin, FLEET_BRAND] for vin in vins)
    partial.replace(path)
    return path
