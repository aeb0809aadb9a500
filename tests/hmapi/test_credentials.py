from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ingest.errors import CredentialError
from ingest.hmapi import Secret, load_signing_key

from .conftest import KEY_ID


def _pem(key: object, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def _same_key(a: ec.EllipticCurvePrivateKey, b: ec.EllipticCurvePrivateKey) -> bool:
    return a.private_numbers() == b.private_numbers()


def test_console_json_file_is_loaded_with_its_id(
    key_json_file: Path, private_key: ec.EllipticCurvePrivateKey
) -> None:
    key = load_signing_key(key_json_file)
    assert key.key_id == KEY_ID
    assert key.require_id() == KEY_ID
    assert _same_key(key.private_key.reveal(), private_key)


@pytest.mark.parametrize(
    ("fmt", "label"),
    [
        (serialization.PrivateFormat.PKCS8, b"-----BEGIN PRIVATE KEY-----"),
        (serialization.PrivateFormat.TraditionalOpenSSL, b"-----BEGIN EC PRIVATE KEY-----"),
    ],
)
def test_pem_pkcs8_and_sec1_are_loaded(
    tmp_path: Path,
    private_key: ec.EllipticCurvePrivateKey,
    fmt: serialization.PrivateFormat,
    label: bytes,
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(_pem(private_key, fmt))
    assert path.read_bytes().startswith(label)
    key = load_signing_key(path, key_id=KEY_ID)
    assert key.key_id == KEY_ID
    assert _same_key(key.private_key.reveal(), private_key)


def test_pem_without_key_id_loads_but_cannot_sign(
    tmp_path: Path, private_key: ec.EllipticCurvePrivateKey
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(_pem(private_key, serialization.PrivateFormat.PKCS8))
    key = load_signing_key(path)
    with pytest.raises(CredentialError, match="key id") as info:
        key.require_id()
    assert str(path) in str(info.value)


def test_wrong_curve_is_refused_naming_file_and_curve(tmp_path: Path) -> None:
    path = tmp_path / "p384.pem"
    path.write_bytes(
        _pem(ec.generate_private_key(ec.SECP384R1()), serialization.PrivateFormat.PKCS8)
    )
    with pytest.raises(CredentialError, match="secp384r1") as info:
        load_signing_key(path, key_id=KEY_ID)
    assert str(path) in str(info.value)
    assert "P-256" in str(info.value)


def test_rsa_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rsa.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(_pem(key, serialization.PrivateFormat.PKCS8))
    with pytest.raises(CredentialError, match="non-EC"):
        load_signing_key(path, key_id=KEY_ID)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a key at all", "no PEM private key"),
        (
            b"-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n",
            "cannot be parsed",
        ),
        (b"{not json", "not valid JSON"),
        (b'{"id": "x"}', "'private_key'"),
        (b'{"private_key": 5, "id": 7}', "'private_key' and 'id'"),
        (b"[1, 2]", "no PEM private key"),
        (b'{"private_key": null, "id": "x"} ', "lacks"),
    ],
)
def test_garbage_is_refused_with_the_reason(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "broken.key"
    path.write_bytes(b"  " + content if content.startswith(b"{") else content)
    with pytest.raises(CredentialError) as info:
        load_signing_key(path, key_id=KEY_ID)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(CredentialError, match="cannot read") as info:
        load_signing_key(path)
    assert str(path) in str(info.value)


def test_encrypted_key_asks_for_an_unencrypted_export(
    tmp_path: Path, private_key: ec.EllipticCurvePrivateKey
) -> None:
    path = tmp_path / "enc.pem"
    path.write_bytes(_pem(private_key, serialization.PrivateFormat.PKCS8, b"pw"))
    with pytest.raises(CredentialError, match="encrypted"):
        load_signing_key(path, key_id=KEY_ID)


def test_key_id_conflicting_with_the_file_is_refused(key_json_file: Path) -> None:
    with pytest.raises(CredentialError, match="differs"):
        load_signing_key(key_json_file, key_id="another-id")


def test_error_messages_never_quote_key_material(
    tmp_path: Path, private_key: ec.EllipticCurvePrivateKey
) -> None:
    pem = _pem(private_key, serialization.PrivateFormat.PKCS8).decode()
    path = tmp_path / "k.json"
    path.write_bytes(orjson.dumps({"private_key": pem.replace("A", "!"), "id": KEY_ID}))
    with pytest.raises(CredentialError) as info:
        load_signing_key(path)
    body = pem.splitlines()[1]
    assert body[:20] not in str(info.value)


def test_secret_hides_its_value_everywhere() -> None:
    secret = Secret("hunter2-value")
    assert repr(secret) == "***"
    assert str(secret) == "***"
    assert f"{secret}" == "***"
    assert "hunter2" not in repr([secret, {"k": secret}])
    assert secret.reveal() == "hunter2-value"
    assert secret == Secret("hunter2-value")
    assert secret != Secret("other")


def test_signing_key_repr_hides_the_key(key_json_file: Path) -> None:
    key = load_signing_key(key_json_file)
    text = repr(key)
    assert "***" in text
    assert "EllipticCurvePrivateKey" not in text
