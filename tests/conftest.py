"""Shared fixtures: one throwaway PKI per test session, one real Mosquitto per test, and a real
S3-compatible server (moto) for the tests that ask for one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.testing import CertBundle, MosquittoBroker, make_certs
from tests.storage.s3_support import MotoS3


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """An in-process ``cli.main()`` points the root logger at this test's captured stderr, which
    closes with the test; put the handlers back, or a thread that logs later (a session still
    reconnecting) meets a closed stream and prints a logging error into the run's output."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    """CA, server, client, expired and foreign-CA certificates, generated once per run."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def broker(tmp_path: Path, certs: CertBundle) -> Iterator[MosquittoBroker]:
    """A mutual-TLS Mosquitto with persistence on a free port, stopped after the test either way."""
    with MosquittoBroker(tmp_path / "broker", certs) as running:
        yield running


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    """A moto S3 server on a free loopback port, reached through the AWS_* environment."""
    server = MotoS3()
    for name, value in server.environment().items():
        monkeypatch.setenv(name, value)
    server.start()
    try:
        yield server
    finally:
        server.stop()
