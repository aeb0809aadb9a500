"""An emulator of High Mobility: its REST side (auth, fleet clearance, eligibility, webhooks) and,
optionally, the vehicle stream (:mod:`ingest.emulator.stream`: telemetry over mutual-TLS MQTT for
every approved VIN).

It serves real HTTP on loopback so the real client can be tested and demonstrated without HM.
Entry points: :class:`EmulatorServer` (in-process, tests), :func:`run_emulator` (serve and print
one JSON line), and ``ingest.emulator.cli`` (``add_arguments`` / ``main`` for ``hm-ingest``).
Admin endpoints under ``/_emulator`` are listed in :mod:`ingest.emulator.admin` (the stream's
``/_emulator/stream`` in :mod:`ingest.emulator.stream.admin`).
"""

from ingest.emulator.app import EmulatorServer, run_emulator
from ingest.emulator.clock import ManualClock, SystemClock
from ingest.emulator.context import EmulatorConfig
from ingest.emulator.faults import Fault
from ingest.emulator.rules import Behaviour, Delays, Outcome, OutcomeRule

__all__ = [
    "Behaviour",
    "Delays",
    "EmulatorConfig",
    "EmulatorServer",
    "Fault",
    "ManualClock",
    "Outcome",
    "OutcomeRule",
    "SystemClock",
    "run_emulator",
]
