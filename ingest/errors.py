"""The project's exception tree.

::

    IngestError                      retriable: bool (per class, may be overridden per instance)
    ├── ConfigError                  invalid settings; names the key and the fix (not retriable)
    ├── CredentialError              certificate / key problems found by ``check`` or at connect
    ├── SchemaError                  a table schema file is missing or malformed
    ├── LogError                     the write-ahead log cannot be written or read
    │   ├── LogCorruptError          a record failed its checksum outside the tail (not retriable)
    │   └── LogFullError             the log reached its size cap; acks pause (retriable)
    ├── SinkError                    Parquet output could not be committed (retriable: disk, store)
    ├── BrokerError                  MQTT connection or protocol failure (retriable)
    └── ApiError                     HM REST API error (status, title, detail, source)
        ├── AuthError                401/403 or a token could not be obtained
        ├── RateLimitedError         429; carries ``retry_after_s``
        └── ServerError              5xx or a connection failure (retriable)

Foreign exceptions (paho, httpx, OSError) are translated where they enter the project, with
``raise ... from exc`` so the cause stays attached.
"""

from __future__ import annotations


class IngestError(Exception):
    """Root of every error this project raises on purpose."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(IngestError):
    """Settings are invalid. ``key`` is the dotted setting name (``mqtt.port``) when known."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class CredentialError(IngestError):
    """A certificate, key or CA file is missing, unreadable, mismatched or expired."""


class SchemaError(IngestError):
    """A table schema definition in ``schemas/`` is missing or malformed."""


class LogError(IngestError):
    """The write-ahead log could not be written or read."""

    retriable = True


class LogCorruptError(LogError):
    """A record failed its checksum somewhere other than the torn tail of the last segment."""

    retriable = False


class LogFullError(LogError):
    """The log reached its size cap: acknowledgements pause until the sink catches up."""


class SinkError(IngestError):
    """Parquet output could not be committed (disk full, permissions, object store outage)."""

    retriable = True


class BrokerError(IngestError):
    """The MQTT connection failed or the broker refused us."""

    retriable = True


class ApiError(IngestError):
    """HM's REST API answered with an error.

    ``title``, ``detail`` and ``source`` come from HM's error body (any of its three shapes);
    ``status`` is the HTTP status code (0 when no response arrived).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        title: str | None = None,
        detail: str | None = None,
        source: str | None = None,
        retriable: bool | None = None,
    ) -> None:
        super().__init__(message, retriable=retriable)
        self.status = status
        self.title = title
        self.detail = detail
        self.source = source


class AuthError(ApiError):
    """Authentication failed or no token could be obtained."""


class RateLimitedError(ApiError):
    """HM answered 429; ``retry_after_s`` is the wait it asked for."""

    retriable = True

    def __init__(self, message: str, *, retry_after_s: float, **kwargs: object) -> None:
        super().__init__(message, status=429, **kwargs)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class ServerError(ApiError):
    """HM answered 5xx, or the connection failed before an answer arrived."""

    retriable = True
