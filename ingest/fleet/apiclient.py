"""``[api]`` settings → a ready :class:`~ingest.hmapi.HmApiClient` whose events feed the metrics."""

from __future__ import annotations

from typing import Any

from ingest.config import ApiSettings
from ingest.hmapi import (
    ApiEvent,
    AuthSettings,
    EventHook,
    HmApiClient,
    RequestEvent,
    RetryEvent,
    Secret,
    TokenRenewedEvent,
)
from ingest.metrics import Metrics


def auth_settings(settings: ApiSettings) -> AuthSettings:
    """The client's auth settings; raises ConfigError naming the missing ``api.*`` key."""
    secret = settings.client_secret.get_secret_value()
    return AuthSettings(
        auth=settings.auth,
        client_id=settings.client_id or None,
        client_secret=Secret(secret) if secret else None,
        private_key_file=settings.private_key_file,
    )


def metrics_hook(metrics: Metrics) -> EventHook:
    """Client events → ``hm_ingest_api_*`` and ``hm_ingest_token_renewals_total``."""

    def on_event(event: ApiEvent) -> None:
        if isinstance(event, RequestEvent):
            metrics.api_requests.labels(event.endpoint, str(event.status)).inc()
            metrics.api_latency.labels(event.endpoint).observe(event.latency_s)
        elif isinstance(event, RetryEvent):
            metrics.api_retries.labels(event.cause).inc()
        elif isinstance(event, TokenRenewedEvent):
            metrics.token_renewals.inc()

    return on_event


def build_api_client(
    settings: ApiSettings, *, metrics: Metrics | None = None, **client_options: Any
) -> HmApiClient:
    """An HM API client for ``settings`` (close it: ``async with`` or ``await client.aclose()``).

    ``client_options`` go to :class:`~ingest.hmapi.HmApiClient` as they are (``retry``,
    ``sleep``, ``on_event``... for tests); a given ``on_event`` replaces the metrics hook.
    """
    if metrics is not None:
        client_options.setdefault("on_event", metrics_hook(metrics))
    return HmApiClient(
        auth_settings(settings),
        environment=settings.environment,
        base_url=settings.base_url,
        timeout_s=settings.timeout_s,
        **client_options,
    )


__all__ = ["auth_settings", "build_api_client", "metrics_hook"]
