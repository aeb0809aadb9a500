"""Loading the EC P-256 signing key used for HM's JWT assertions.

Accepted as-is:

* the JSON file the HM console downloads (``service-account-private-key-<id>.json`` holding
  ``{"inserted_at", "private_key", "instance_uri", "token_uri", "id"}``); ``id`` becomes the
  JWT ``iss``;
* a PEM file, PKCS#8 (``BEGIN PRIVATE KEY``) or, for older keys, SEC1 (``BEGIN EC PRIVATE KEY``);
  a PEM carries no id, so the caller passes ``key_id``.

Every failure is a :class:`~ingest.errors.CredentialError` naming the file and what is wrong, never
quoting key material.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ingest.errors import CredentialError
from ingest.hmapi.secret import Secret

# HM signs and verifies ES256 only, which is ECDSA over P-256.
_CURVE = ec.SECP256R1


@dataclass(frozen=True)
class SigningKey:
    """A P-256 private key and the id HM knows it by (``None`` if the file did not say)."""

    private_key: Secret[ec.EllipticCurvePrivateKey]
    key_id: str | None
    source: Path

    def require_id(self) -> str:
        if not self.key_id:
            raise CredentialError(
                f"{self.source}: a PEM key carries no key id, which HM needs as the JWT 'iss'; "
                "use the JSON key file downloaded from HM's console, or set the key id explicitly"
            )
        return self.key_id


def load_signing_key(path: Path | str, *, key_id: str | None = None) -> SigningKey:
    """Read the key at ``path`` (console JSON or PEM). ``key_id`` overrides a PEM's missing id."""
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise CredentialError(
            f"{source}: cannot read the private key file ({exc.strerror or exc})"
        ) from exc
    if raw.lstrip().startswith(b"{"):
        pem, file_id = _from_console_json(source, raw)
        if key_id and file_id != key_id:
            raise CredentialError(
                f"{source}: the key file's id {file_id!r} differs from the configured key id "
                f"{key_id!r}; remove the setting or use the matching key file"
            )
        key_id = file_id
    else:
        pem = raw
    return SigningKey(private_key=Secret(_parse_pem(source, pem)), key_id=key_id, source=source)


def _from_console_json(source: Path, raw: bytes) -> tuple[bytes, str]:
    try:
        document: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CredentialError(
            f"{source}: looks like HM's JSON key file but is not valid JSON ({exc.msg})"
        ) from None
    if not isinstance(document, dict):
        raise CredentialError(f"{source}: expected a JSON object with 'private_key' and 'id'")
    missing = [name for name in ("private_key", "id") if not isinstance(document.get(name), str)]
    if missing:
        raise CredentialError(
            f"{source}: HM key file lacks {' and '.join(repr(m) for m in missing)} (as strings); "
            "download the service account key again from HM's console"
        )
    pem: str = document["private_key"]
    if "\n" not in pem and "\\n" in pem:
        # Tolerate a file whose newlines were escaped twice by copy-paste.
        pem = pem.replace("\\n", "\n")
    return pem.encode(), document["id"]


def _parse_pem(source: Path, pem: bytes) -> ec.EllipticCurvePrivateKey:
    if b"-----BEGIN" not in pem:
        raise CredentialError(
            f"{source}: no PEM private key found (expected '-----BEGIN PRIVATE KEY-----' or "
            "'-----BEGIN EC PRIVATE KEY-----', or HM's JSON key file)"
        )
    try:
        key = load_pem_private_key(pem, password=None)
    except TypeError as exc:
        # cryptography raises TypeError for a missing password.
        raise CredentialError(
            f"{source}: the private key is encrypted; export it without a password"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CredentialError(
            f"{source}: the PEM private key cannot be parsed (corrupt or unsupported format)"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(
            f"{source}: holds a non-EC key ({type(key).__name__}); HM keys are EC P-256"
        )
    if not isinstance(key.curve, _CURVE):
        raise CredentialError(
            f"{source}: holds an EC key on curve {key.curve.name}; HM's ES256 needs P-256 "
            "(secp256r1)"
        )
    return key
