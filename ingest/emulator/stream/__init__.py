"""The emulator's vehicle stream: Auto API telemetry over mutual-TLS MQTT for approved VINs.

Part of ``hm-ingest emulator`` (``--mqtt-broker`` turns it on). Modules, one job each:

* :mod:`.config`    what to send (format, rates, seed) and where (broker, certificates)
* :mod:`.vehicle`   one vehicle's physical model and its Auto API property values
* :mod:`.route`     city loops the vehicles drive
* :mod:`.messages`  V1 / V2 / deliberately bad or malformed MQTT messages built from those values
* :mod:`.publisher` the paho client (QoS 1, PUBACKs counted)
* :mod:`.counters`  what was sent, in total and per VIN
* :mod:`.runner`    follows the clearance store and paces the publishing
* :mod:`.admin`     ``GET``/``PUT /_emulator/stream``
"""

from ingest.emulator.stream.config import (
    BrokerTarget,
    StreamConfig,
    StreamFormat,
    StreamSettings,
)
from ingest.emulator.stream.messages import BAD_KINDS, MALFORMED_KINDS, Outgoing
from ingest.emulator.stream.publisher import StreamConnectError
from ingest.emulator.stream.runner import VehicleStream

__all__ = [
    "BAD_KINDS",
    "MALFORMED_KINDS",
    "BrokerTarget",
    "Outgoing",
    "StreamConfig",
    "StreamConnectError",
    "StreamFormat",
    "StreamSettings",
    "VehicleStream",
]
