"""Test helpers shipped with the package: throwaway PKI, a real Mosquitto, test publishers.

Used by this project's tests and usable by anyone testing against it. Names are imported on first
use: ``python -m ingest.testing.certs`` must not find its own module already imported by this
package (runpy warns about that), and generating certificates should not import paho.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.testing.broker import BrokerStartError, MosquittoBroker
    from ingest.testing.certs import CertBundle, make_certs
    from ingest.testing.publish import Publisher, publish_lines

_HOMES = {
    "BrokerStartError": "ingest.testing.broker",
    "MosquittoBroker": "ingest.testing.broker",
    "CertBundle": "ingest.testing.certs",
    "make_certs": "ingest.testing.certs",
    "Publisher": "ingest.testing.publish",
    "publish_lines": "ingest.testing.publish",
}

__all__ = [
    "BrokerStartError",
    "CertBundle",
    "MosquittoBroker",
    "Publisher",
    "make_certs",
    "publish_lines",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ingest.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
