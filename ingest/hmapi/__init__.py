"""Async client for High Mobility's REST API (fleet clearance, eligibility, OAuth tokens).

Built on httpx; errors are the project's :class:`~ingest.errors.ApiError` tree; metrics attach
through the ``on_event`` hook (:mod:`ingest.hmapi.events`) so this package never imports
prometheus.
"""

from ingest.hmapi.auth import AuthFlowName, AuthSettings, build_assertion
from ingest.hmapi.client import DEFAULT_CHUNK_SIZE, HmApiClient, TokenHint
from ingest.hmapi.credentials import SigningKey, load_signing_key
from ingest.hmapi.environments import BASE_URLS, ApiEndpoint, Environment, resolve_endpoint
from ingest.hmapi.errors import NotFoundError, parse_error_body
from ingest.hmapi.events import ApiEvent, EventHook, RequestEvent, RetryEvent, TokenRenewedEvent
from ingest.hmapi.models import (
    ChangelogEntry,
    Clearance,
    ClearanceResult,
    ClearanceStatus,
    Eligibility,
    Odometer,
    VehicleAccessToken,
    VehicleRequest,
)
from ingest.hmapi.retry import RetryPolicy
from ingest.hmapi.secret import Secret
from ingest.hmapi.tokens import TokenProvider
from ingest.hmapi.validation import (
    BRANDS,
    InvalidVehicleError,
    suggest_brand,
    validate_vehicle,
    validate_vin,
)

__all__ = [
    "BASE_URLS",
    "BRANDS",
    "DEFAULT_CHUNK_SIZE",
    "ApiEndpoint",
    "ApiEvent",
    "AuthFlowName",
    "AuthSettings",
    "ChangelogEntry",
    "Clearance",
    "ClearanceResult",
    "ClearanceStatus",
    "Eligibility",
    "Environment",
    "EventHook",
    "HmApiClient",
    "InvalidVehicleError",
    "NotFoundError",
    "Odometer",
    "RequestEvent",
    "RetryEvent",
    "RetryPolicy",
    "Secret",
    "SigningKey",
    "TokenHint",
    "TokenProvider",
    "TokenRenewedEvent",
    "VehicleAccessToken",
    "VehicleRequest",
    "build_assertion",
    "load_signing_key",
    "parse_error_body",
    "resolve_endpoint",
    "suggest_brand",
    "validate_vehicle",
    "validate_vin",
]
