"""HM's error bodies, and the exception handlers raise to answer with one.

Three shapes exist on HM's REST side:

* OAuth endpoints: ``{"error", "error_description"}``;
* everything else: ``{"errors": [{"title", "detail", "source"}]}``;
* the Service Account API's 404/422: a bare array ``[{"title", "detail", "source"}]`` (its
  OpenAPI file types those bodies as ``Errors``, an array; the reference notes HM's SDK meets both).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web


class ApiFailure(Exception):
    """Raised by handlers and helpers; the error middleware returns ``response``."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _item(title: str, detail: str, source: str) -> dict[str, str]:
    return {"title": title, "detail": detail, "source": source}


def hm_error(
    status: int,
    title: str,
    detail: str,
    source: str,
    headers: Mapping[str, str] | None = None,
) -> ApiFailure:
    body = {"errors": [_item(title, detail, source)]}
    return ApiFailure(web.json_response(body, status=status, headers=headers))


def hm_error_array(status: int, title: str, detail: str, source: str) -> ApiFailure:
    return ApiFailure(web.json_response([_item(title, detail, source)], status=status))


def oauth_error(detail: str, error: str = "invalid_request", status: int = 400) -> ApiFailure:
    # HM's OAuth spec documents every failure of POST /v1/access_tokens as 400 with
    # error "invalid_request" (even "client_secret is invalid"), so that is the default here.
    body = {"error": error, "error_description": detail}
    return ApiFailure(web.json_response(body, status=status))


def unauthorized(detail: str) -> ApiFailure:
    return hm_error(401, "Not authorized", detail, "Authorization")


async def read_params(request: web.Request) -> dict[str, Any]:
    """A request body as a dict, JSON or form-encoded (HM's own code sends both)."""
    if request.content_type == "application/x-www-form-urlencoded":
        return dict((await request.post()).items())
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise hm_error(400, "Bad request", "body is not valid JSON", "body") from exc
    if not isinstance(body, dict):
        raise hm_error(422, "Invalid input", "body must be a JSON object", "body")
    return body
