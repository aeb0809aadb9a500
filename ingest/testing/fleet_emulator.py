"""The HM emulator's REST side as a child process, and the fleet file a daemon reads, for tests.

VIN-sharded replicas (``[replica] mode = "vin"``) take the VINs they subscribe from their
clearance state and the fleet file, so a test of them needs HM's fleet API: this runs
``hm-ingest emulator`` (no vehicle stream; the test publishes itself) over real HTTP with a short
decision delay and every VIN approved, and writes the fleet file the leader adds VINs from. VINs
reach HM the real way: the fleet file, then the leader's adds.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ingest.demo.emulator import EmulatorProcess

# A brand HM's fleet API accepts for any VIN (the emulator's catalogue).
FLEET_BRAND = "sandbox"


class FleetEmulator:
    """``hm-ingest emulator`` on a loopback port; its state, JSON line and log under ``folder``."""

    def __init__(self, folder: Path, *, decision_delay_s: float = 0.5) -> None:
        self.process = EmulatorProcess(folder)
        self.decision_delay_s = decision_delay_s

    def start(self) -> dict[str, Any]:
        """Start it and return its start-up JSON (URLs and credentials)."""
        return self.process.launch([
            "--decision-delay-s", str(self.decision_delay_s),
            # The test VINs (ingest.testing.traffic.make_vin) end in any letter; the default rule
            # rejects those ending in R, and a rejected VIN is not what these tests are about.
            "--outcome", "*=approved",
        ])  # fmt: skip

    def api_settings(self) -> dict[str, Any]:
        """The daemon's ``[api]`` section for this emulator."""
        info = self.process.info
        return {
            "base_url": info["base_url"],
            "client_id": info["client_id"],
            "client_secret": info["client_secret"],
            "auth": "client_credentials",
        }

    def statuses(self) -> dict[str, str]:
        """VIN → clearance status as HM's side holds it."""
        return self.process.clearances()

    def stop(self) -> int | None:
        return self.process.stop()


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
