"""The VIN-sharded group the replica scenario tests run: three replicas, a 4 s lease."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import CertBundle
from ingest.testing.replicas import ReplicaGroup

LEASE_S = 4.0
HEARTBEAT_S = 1.0


def vin_group(
    broker: MosquittoBroker,
    certs: CertBundle,
    tmp_path: Path,
    protocol: Literal["3.1.1", "5"] = "3.1.1",
) -> ReplicaGroup:
    return ReplicaGroup(
        broker,
        certs,
        tmp_path,
        lease_s=LEASE_S,
        heartbeat_s=HEARTBEAT_S,
        mode="vin",
        protocol=protocol,
    )
