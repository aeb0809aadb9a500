"""ingest.logs: the JSON line format and the redaction of secrets, through the real root logger."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.config import load_settings
from ingest.logs import configure, redact

JWT = jwt.encode(
    {"sub": "fleet-client", "scope": "vehicle:read"}, "signing-key-for-tests-0123456789abcdef"
)
BEARER = "opaque-access-token_4f9a2c.7e1b"
PEM_KEY = (
    ec.generate_private_key(ec.SECP256R1())
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode()
)
# The base64 body of the key: the part that must never reach a log line.
PEM_BODY = PEM_KEY.splitlines()[1]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """configure() replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(text: str) -> list[dict[str, object]]:
    lines = text.splitlines()
    assert lines, "nothing was logged"
    return [orjson.loads(line) for line in lines]


def assert_no_secrets(text: str) -> None:
    assert JWT not in text
    assert BEARER not in text
    assert PEM_BODY not in text
    assert "PRIVATE KEY-----" not in text


def test_secret_fixtures_look_like_what_the_patterns_target() -> None:
    # Guards the other tests: if these stopped being a JWT / a PEM key, redaction tests would
    # pass for the wrong reason.
    assert JWT.startswith("eyJ")
    assert JWT.count(".") == 2
    assert PEM_KEY.startswith("-----BEGIN PRIVATE KEY-----")
    assert len(PEM_BODY) > 40


def test_json_format_is_one_object_per_line(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO", "json")
    logging.getLogger("ingest.test.one").info("connected to %s:%d", "broker", 8883)
    logging.getLogger("ingest.test.two").warning("line one\nline two")
    logging.getLogger("ingest.test.one").debug("below the level")

    entries = json_lines(capsys.readouterr().err)
    assert len(entries) == 2
    first, second = entries
    assert first["level"] == "info"
    assert first["logger"] == "ingest.test.one"
    assert first["msg"] == "connected to broker:8883"
    assert isinstance(first["ts"], str)
    assert str(first["ts"]).endswith("Z")
    assert second["level"] == "warning"
    assert second["logger"] == "ingest.test.two"
    # A multi-line message stays on one line of output, escaped inside the JSON string.
    assert second["msg"] == "line one\nline two"


def test_json_format_carries_exception_text(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO", "json")
    try:
        raise ConnectionError("broker went away")
    except ConnectionError:
        logging.getLogger("ingest.test").exception("session lost")
    (entry,) = json_lines(capsys.readouterr().err)
    assert entry["msg"] == "session lost"
    assert entry["level"] == "error"
    assert "ConnectionError: broker went away" in str(entry["exc"])
    assert "Traceback" in str(entry["exc"])


def test_level_setting_is_applied(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("WARNING", "json")
    logging.getLogger("ingest.test").info("quiet")
    logging.getLogger("ingest.test").error("loud")
    assert [e["msg"] for e in json_lines(capsys.readouterr().err)] == ["loud"]


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_secrets_in_messages_are_masked(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    configure("INFO", fmt)  # type: ignore[arg-type]
    log = logging.getLogger("ingest.test")
    log.info("token response: %s", JWT)
    log.info("sending Authorization: Bearer %s to the API", BEARER)
    log.info("loaded key\n%s", PEM_KEY)
    log.info(f"inline, not as an argument: {JWT}")
    output = capsys.readouterr().err
    assert_no_secrets(output)
    assert output.count("[redacted]") == 4
    # The surrounding text survives, so the line is still useful.
    assert "Authorization: Bearer [redacted] to the API" in output
    assert "token response: [redacted]" in output


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_secrets_in_exception_text_are_masked(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    configure("INFO", fmt)  # type: ignore[arg-type]
    try:
        try:
            raise ValueError(f"could not parse key:\n{PEM_KEY}")
        except ValueError as inner:
            raise RuntimeError(f"token {JWT} rejected; header was Bearer {BEARER}") from inner
    except RuntimeError:
        logging.getLogger("ingest.test").exception("refresh failed")
    output = capsys.readouterr().err
    assert "refresh failed" in output
    assert "RuntimeError" in output
    assert "ValueError" in output
    assert_no_secrets(output)
    assert output.count("[redacted]") >= 3


def test_secret_setting_logged_with_percent_s_shows_no_secret(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not a token shape: only SecretStr, not the redacting filter, can hide this one.
    secret = "plain-client-secret-93c1"
    settings = load_settings(
        None,
        {
            "HM_INGEST_MQTT_APP_ID": "logs-test",
            "HM_INGEST_API_CLIENT_SECRET": secret,
            "HM_INGEST_WEBHOOK_SECRET": secret,
        },
    )
    assert settings.api.client_secret.get_secret_value() == secret
    configure("INFO", "json")
    log = logging.getLogger("ingest.test")
    log.info("client secret is %s", settings.api.client_secret)
    log.info("api settings %s / %r", settings.api, settings.api)
    log.info("all settings %s", settings)
    output = capsys.readouterr().err
    assert secret not in output
    assert "**********" in output
    assert len(json_lines(output)) == 3


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "vehicle WVWZZZ1JZ3W386752 sent 12 properties; eyJ alone is only a prefix"
    assert redact(text) == text


def test_redact_masks_each_kind() -> None:
    assert redact(f"a {JWT} b") == "a [redacted] b"
    assert redact(f"Authorization: bearer {BEARER}") == "Authorization: bearer [redacted]"
    assert redact(f"x {PEM_KEY.strip()} y") == "x [redacted] y"
