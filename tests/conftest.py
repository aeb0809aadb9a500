"""Shared fixtures: one throwaway PKI per test session, one real Mosquitto per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.testing import CertBundle, MosquittoBroker, make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    """CA, server, client, expired and foreign-CA certificates, generated once per run."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def broker(tmp_path: Path, certs: CertBundle) -> Iterator[MosquittoBroker]:
    """A mutual-TLS Mosquitto with persistence on a free port, stopped after the test either way."""
    with MosquittoBroker(tmp_path / "broker", certs) as running:
        yield running
