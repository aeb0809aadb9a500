"""Logging set-up: a human format for terminals, one JSON object per line for containers.

Secrets never reach a log line: settings hold them as ``SecretStr`` (``str`` gives asterisks),
HM tokens are wrapped the same way in the API client, and as a last line of defence
:class:`RedactingFilter` masks anything that looks like a bearer token, a JWT or a PEM key.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Literal

import orjson

_SECRET_PATTERNS = (
    # PEM blocks (private keys, certificates) in full.
    re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.S),
    # JWTs: three base64url segments, the first starting with '{"' encoded ("eyJ").
    re.compile(r"eyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]{5,}"),
    # Authorization header values.
    re.compile(r"(?i)(bearer\s+)[\w.~+/-]+=*"),
)


def redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[redacted]", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        # Exception text too: logging.Formatter appends record.exc_text verbatim, so without this
        # a token in an exception message reaches the human format unmasked.
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_PLAIN = logging.Formatter()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


def configure(level: str = "INFO", fmt: Literal["human", "json"] = "human") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request line at INFO, VINs in the URL included; our client logs what
    # matters (retries, failures) itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
