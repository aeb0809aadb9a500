from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.errors import ApiError, AuthError, RateLimitedError, ServerError
from ingest.hmapi.errors import (
    ErrorItem,
    NotFoundError,
    error_from_response,
    parse_error_body,
    retry_after_s,
)

NOW = 1_700_000_000.0


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=body, headers=headers)


def _error(status: int, body: bytes, headers: dict[str, str] | None = None) -> ApiError:
    return error_from_response(
        _response(status, body, headers),
        endpoint="test",
        default_retry_after_s=10.0,
        now=lambda: NOW,
    )


def test_errors_object_shape() -> None:
    body = b'{"errors": [{"title": "Conflict", "detail": "Clearance is already removed", '
    body += b'"source": "vin"}]}'
    error = _error(409, body)
    assert type(error) is ApiError
    assert (error.status, error.title, error.detail, error.source) == (
        409,
        "Conflict",
        "Clearance is already removed",
        "vin",
    )
    assert "Clearance is already removed" in str(error)


def test_bare_array_shape() -> None:
    body = b'[{"title": "Not found", "detail": "no such vin"}, {"title": "second", "detail": "x"}]'
    error = _error(404, body)
    assert isinstance(error, NotFoundError)
    assert (error.title, error.detail, error.source) == ("Not found", "no such vin", None)
    assert "second: x" in str(error)


def test_oauth_shape() -> None:
    error = _error(
        401, b'{"error": "invalid_client", "error_description": "client_secret is invalid"}'
    )
    assert isinstance(error, AuthError)
    assert (error.title, error.detail) == ("invalid_client", "client_secret is invalid")


def test_nested_array_inside_errors_as_in_the_spec() -> None:
    # hm-fleet-clearance-v1.yml's ClearanceUnauthorizedErrors nests an Errors array in "errors".
    body = b'{"errors": [[{"detail": "Missing or invalid authorization header", '
    body += b'"source": "Authorization"}]]}'
    error = _error(401, body)
    assert error.detail == "Missing or invalid authorization header"
    assert error.source == "Authorization"


@pytest.mark.parametrize("body", [b"<html>Bad Gateway</html>", b"", b"   "])
def test_non_json_bodies(body: bytes) -> None:
    error = _error(502, body)
    assert isinstance(error, ServerError)
    assert error.retriable
    assert error.detail == (body.decode().strip() or None)
    assert "502" in str(error)


def test_long_bodies_are_cut() -> None:
    error = _error(500, b"x" * 10_000)
    assert error.detail is not None
    assert len(error.detail) < 400


def test_source_objects_are_kept_readable() -> None:
    error = _error(422, b'{"errors": [{"title": "t", "source": {"pointer": "/vin"}}]}')
    assert error.source == '{"pointer":"/vin"}'


@pytest.mark.parametrize(
    ("headers", "detail", "expected"),
    [
        ({"Retry-After": "12"}, None, 12.0),
        ({"Retry-After": "1.5"}, None, 1.5),
        ({"Retry-After": "Tue, 14 Nov 2023 22:13:50 GMT"}, None, 30.0),  # NOW + 30 s
        ({"Retry-After": "Tue, 14 Nov 2023 22:00:00 GMT"}, None, 0.0),  # already past
        ({}, "retry after 10s", 10.0),
        ({}, "Please retry after 2 seconds", 2.0),
        ({}, "Retry-After: 500ms", 0.5),
        ({"Retry-After": "soon"}, "retry after 4s", 4.0),
        ({}, "slow down", None),
        ({"Retry-After": "nan"}, None, None),
    ],
)
def test_retry_after(headers: dict[str, str], detail: str | None, expected: float | None) -> None:
    wait = retry_after_s(
        httpx.Headers(headers),
        [ErrorItem(title="Too many requests", detail=detail)],
        now=lambda: NOW,
    )
    assert wait == expected


def test_429_uses_default_wait_when_hm_names_none() -> None:
    error = _error(429, b'{"errors": [{"title": "Too many requests"}]}')
    assert isinstance(error, RateLimitedError)
    assert error.retry_after_s == 10.0


def test_429_from_detail() -> None:
    error = _error(429, b'{"errors": [{"title": "Too many requests", "detail": "retry after 7s"}]}')
    assert isinstance(error, RateLimitedError)
    assert error.retry_after_s == 7.0


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["errors", "error", "error_description", "title", "detail", "source"])
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(json_values, st.sampled_from([400, 401, 403, 404, 409, 422, 429, 500, 503]))
def test_any_json_body_yields_an_api_error(value: object, status: int) -> None:
    error = _error(status, json.dumps(value).encode())
    assert isinstance(error, ApiError)
    assert error.status == status
    for text in (error.title, error.detail, error.source):
        assert text is None or isinstance(text, str)
    if status == 429:
        assert isinstance(error, RateLimitedError)
        assert error.retry_after_s >= 0


@given(st.binary(max_size=200), st.text(max_size=40))
def test_any_bytes_and_retry_after_header_never_crash(body: bytes, header: str) -> None:
    try:
        headers = httpx.Headers({"Retry-After": header})
    except (UnicodeEncodeError, ValueError):
        headers = httpx.Headers()
    response = httpx.Response(429, content=body, headers=headers)
    error = error_from_response(response, endpoint="t", default_retry_after_s=1.0, now=lambda: NOW)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after_s >= 0


@given(json_values)
def test_parse_error_body_returns_items(value: object) -> None:
    items = parse_error_body(json.dumps(value).encode())
    assert all(isinstance(item, ErrorItem) for item in items)
