"""``hm-ingest demo``: the whole system on this machine, with no HM account.

It starts a local mutual-TLS Mosquitto with throwaway certificates, the HM emulator (REST API and
vehicle stream) and the real daemon (``hm-ingest run``) with a sample fleet file. The daemon asks
the emulator to clear the fleet; the emulator approves most VINs and rejects those ending in ``R``;
approved vehicles start streaming telemetry (with repeats and some deliberately bad messages);
the daemon writes Parquet. Progress comes from the daemon's ``/metrics``; the end prints a summary,
checks it against what the stream sent, and prints queries to paste.

Modules: :mod:`.cli` (arguments, exit codes), :mod:`.run` (the sequence), :mod:`.workdir` (the
output folder), :mod:`.fleet` (the sample fleet), :mod:`.emulator` (the emulator child process),
:mod:`.metrics` (reading ``/metrics``), :mod:`.report` (summary, checks and queries).
"""

from ingest.demo.cli import add_arguments, main

__all__ = ["add_arguments", "main"]
