"""The emulator's credentials, created on first start and kept in the state directory.

``credentials.json`` holds the OAuth client id and secret, the webhook secret, the emulator's own
token-signing key and the public halves of the two client keys (one for the OAuth
``client_assertion`` flow, one for the Service Account API). The client private keys are written as
the HM console's download format, ``service-account-private-key-<id>.json``, so the client loads
exactly what it would load in production. Their ``instance_uri`` and ``token_uri`` are rewritten on
every start because the port may change (unconfirmed what HM puts there: we use the origin and the
flow's token endpoint).
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.emulator.clock import isoformat

CREDENTIALS_FILE = "credentials.json"


def _new_private_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@dataclass(frozen=True)
class ClientKey:
    """A key pair registered for one JWT flow; ``id`` is what the JWT's ``iss`` must say."""

    id: str
    private_pem: str
    inserted_at: str

    def key_file_name(self) -> str:
        return f"service-account-private-key-{self.id}.json"

    @classmethod
    def generate(cls, now: float) -> ClientKey:
        return cls(str(uuid.uuid4()), _new_private_pem(), isoformat(now))


@dataclass(frozen=True)
class Credentials:
    client_id: str
    client_secret: str
    webhook_secret: str
    signing_key_pem: str  # signs the tokens the emulator issues
    oauth_key: ClientKey  # verifies OAuth client_assertion JWTs
    service_account_key: ClientKey  # verifies Service Account API assertions

    def __repr__(self) -> str:  # never print secrets by accident
        return f"Credentials(client_id={self.client_id!r}, ...)"

    @classmethod
    def generate(cls, now: float) -> Credentials:
        return cls(
            client_id=str(uuid.uuid4()),
            client_secret=secrets.token_urlsafe(24),
            webhook_secret=secrets.token_urlsafe(24),
            signing_key_pem=_new_private_pem(),
            oauth_key=ClientKey.generate(now),
            service_account_key=ClientKey.generate(now),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "webhook_secret": self.webhook_secret,
            "signing_key_pem": self.signing_key_pem,
            "oauth_key": vars(self.oauth_key),
            "service_account_key": vars(self.service_account_key),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Credentials:
        return cls(
            client_id=d["client_id"],
            client_secret=d["client_secret"],
            webhook_secret=d["webhook_secret"],
            signing_key_pem=d["signing_key_pem"],
            oauth_key=ClientKey(**d["oauth_key"]),
            service_account_key=ClientKey(**d["service_account_key"]),
        )


def load_or_create(state_dir: Path, now: float) -> Credentials:
    path = state_dir / CREDENTIALS_FILE
    if path.exists():
        return Credentials.from_json(json.loads(path.read_text(encoding="utf-8")))
    creds = Credentials.generate(now)
    _write_private(path, json.dumps(creds.to_json(), indent=1))
    return creds


def write_key_file(state_dir: Path, key: ClientKey, origin: str, token_uri: str) -> Path:
    """Write ``key`` in the console's download format; returns the file's path."""
    path = state_dir / key.key_file_name()
    body = {
        "inserted_at": key.inserted_at,
        "private_key": key.private_pem,
        "instance_uri": origin,
        "token_uri": token_uri,
        "id": key.id,
    }
    _write_private(path, json.dumps(body, indent=1))
    return path


def _write_private(path: Path, text: str) -> None:
    # Private keys and secrets: owner-only permissions from the moment the file exists.
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
