"""A moto S3 server per test that asks for one (as tests/storage does)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.storage.s3_support import MotoS3


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    server = MotoS3()
    for name, value in server.environment().items():
        monkeypatch.setenv(name, value)
    server.start()
    try:
        yield server
    finally:
        server.stop()
