"""HM environments: the REST base URL and the JWT audience that goes with it.

HM checks a JWT's ``aud`` against the environment it was sent to (a production ``aud`` sent to
the sandbox gives 401), so the audience is always derived from the base URL actually used, and an
override such as the local emulator's loopback address sets both.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from ingest.errors import ConfigError


class Environment(StrEnum):
    PRODUCTION = "production"
    SANDBOX = "sandbox"


BASE_URLS: dict[Environment, str] = {
    Environment.PRODUCTION: "https://api.high-mobility.com/v1",
    Environment.SANDBOX: "https://sandbox.api.high-mobility.com/v1",
}


@dataclass(frozen=True)
class ApiEndpoint:
    """Where requests go (``base_url``, ending in ``/v1``) and the JWT ``aud`` for it."""

    base_url: str
    audience: str

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")


def resolve_endpoint(
    environment: Environment | str = Environment.SANDBOX, base_url: str | None = None
) -> ApiEndpoint:
    """The endpoint for ``environment``, or for ``base_url`` when one is given (it wins)."""
    if base_url:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"api.base_url = {base_url!r} is not an http(s) URL; give the REST base including "
                "/v1, e.g. https://sandbox.api.high-mobility.com/v1",
                key="api.base_url",
            )
        # No trailing slash: ``aud`` must match HM's string exactly, and paths are joined with '/'.
        base = base_url.rstrip("/")
        return ApiEndpoint(base_url=base, audience=base)
    try:
        env = Environment(environment)
    except ValueError as exc:
        valid = ", ".join(e.value for e in Environment)
        raise ConfigError(
            f"api.environment = {environment!r} is unknown; use one of: {valid}",
            key="api.environment",
        ) from exc
    return ApiEndpoint(base_url=BASE_URLS[env], audience=BASE_URLS[env])
