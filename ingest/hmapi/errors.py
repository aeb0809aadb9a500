"""HM error responses → the project's :class:`~ingest.errors.ApiError` tree.

HM answers errors in three shapes, all handled here, plus bodies that are not JSON at all
(a proxy's HTML page, an empty 502):

* ``{"errors": [{"title", "detail", "source"}]}`` (fleet, eligibility, service-account APIs;
  the spec's ``ClearanceUnauthorizedErrors`` even nests an array inside ``errors``);
* a bare array of such error objects (met by HM's SDK);
* OAuth's ``{"error", "error_description"}`` (``/v1/access_tokens``).

The parser is total: any body yields an error object, never an exception of its own.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from ingest.errors import ApiError, AuthError, RateLimitedError, ServerError


class NotFoundError(ApiError):
    """404: the VIN (or other resource) is unknown to HM."""


# HM's 429 detail reads "retry after 10s"; accept minor variants ("Retry-After: 10 seconds").
_RETRY_AFTER_TEXT = re.compile(
    r"retry[\s_-]*after\D{0,3}?(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|secs?|seconds?)?\b",
    re.IGNORECASE,
)
# Bodies quoted in messages are cut here: an HTML error page must not flood the log.
_MAX_TEXT = 300


@dataclass(frozen=True)
class ErrorItem:
    title: str | None = None
    detail: str | None = None
    source: str | None = None


def parse_error_body(body: bytes) -> list[ErrorItem]:
    """Every error HM reported in ``body``, in order; ``[]`` when there is nothing usable."""
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return [ErrorItem(detail=_cut(text))] if text else []
    return list(_items(document))


def _items(document: Any) -> Iterator[ErrorItem]:
    if isinstance(document, list):
        for element in document:
            yield from _items(element)
    elif isinstance(document, dict):
        if "errors" in document:
            yield from _items(document["errors"])
        elif "error" in document or "error_description" in document:
            yield ErrorItem(
                title=_text(document.get("error")), detail=_text(document.get("error_description"))
            )
        elif any(key in document for key in ("title", "detail", "source")):
            yield ErrorItem(
                title=_text(document.get("title")),
                detail=_text(document.get("detail")),
                source=_text(document.get("source")),
            )
    elif isinstance(document, str) and document:
        yield ErrorItem(detail=_cut(document))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _cut(value)
    # JSON:API-style ``source`` objects ({"pointer": ...}) and other surprises: keep them readable.
    return _cut(orjson.dumps(value).decode())


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "…"


def retry_after_s(
    headers: Mapping[str, str], items: list[ErrorItem], *, now: Callable[[], float]
) -> float | None:
    """The wait HM asked for: ``Retry-After`` (seconds or HTTP date), else "retry after Ns"."""
    header = headers.get("retry-after")
    if header:
        header = header.strip()
        try:
            seconds = float(header)
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return max(0.0, seconds)
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - now())
    for item in items:
        for text in (item.detail, item.title):
            match = _RETRY_AFTER_TEXT.search(text or "")
            if match:
                seconds = float(match.group(1))
                unit = (match.group(2) or "s").lower()
                return seconds / 1000 if unit.startswith("m") else seconds
    return None


def error_from_response(
    response: httpx.Response,
    *,
    endpoint: str,
    default_retry_after_s: float,
    now: Callable[[], float],
) -> ApiError:
    """The exception for an unsuccessful ``response`` (not raised here)."""
    status = response.status_code
    items = parse_error_body(response.content)
    first = items[0] if items else ErrorItem()
    summary = "; ".join(
        ": ".join(part for part in (item.title, item.detail) if part) for item in items
    )
    message = f"HM API {endpoint} answered {status}" + (f": {summary}" if summary.strip() else "")
    fields: dict[str, Any] = {"title": first.title, "detail": first.detail, "source": first.source}
    if status == 429:
        wait = retry_after_s(response.headers, items, now=now)
        return RateLimitedError(
            message,
            retry_after_s=default_retry_after_s if wait is None else wait,
            **fields,
        )
    if status in (401, 403):
        return AuthError(message, status=status, **fields)
    if status == 404:
        return NotFoundError(message, status=status, **fields)
    if status >= 500:
        return ServerError(message, status=status, **fields)
    return ApiError(message, status=status, **fields)


def transport_error(exc: httpx.HTTPError, *, endpoint: str) -> ApiError:
    """An httpx failure before any answer arrived, as the project's error (status 0)."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        # A misconfigured base URL: retrying cannot help.
        return ApiError(f"HM API {endpoint}: unsupported URL scheme ({exc})", retriable=False)
    if isinstance(exc, httpx.TimeoutException):
        return ServerError(f"HM API {endpoint}: timed out ({type(exc).__name__})")
    return ServerError(f"HM API {endpoint}: no response ({type(exc).__name__}: {exc})")
