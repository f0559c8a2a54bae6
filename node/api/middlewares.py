"""Cross-cutting HTTP concerns: OpenAI-shaped errors, body limits, CORS, request ids."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..common.errors import (
    DVAIError,
    PermissionDeniedError,
    error_body,
    http_error_body,
    http_error_headers,
)
from ..constants import (
    REQUEST_ID_HEADER,
    REQUEST_ID_MAX_CHARS,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("dvai_request_id", str) if hasattr(web, "RequestKey") else "dvai_request_id"

_REQUEST_ID_RE = re.compile(rf"[\x21-\x7e][\x20-\x7e]{{0,{REQUEST_ID_MAX_CHARS - 1}}}")


def clean_request_id(header: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is 1-128 printable ASCII characters, else a new one
    (the id is echoed in a header, logged and audited: it must be plain text)."""
    if header is not None and _REQUEST_ID_RE.fullmatch(header):
        return header
    return uuid.uuid4().hex


def error_response(error: DVAIError, request_id: str | None = None) -> web.Response:
    headers = dict(error.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return web.json_response(error.to_body(), status=error.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every failure leaves as an OpenAI-shaped JSON error, never a stack trace."""
    request[REQUEST_ID] = clean_request_id(request.headers.get(REQUEST_ID_HEADER))
    try:
        response = await handler(request)
    except DVAIError as exc:
        return error_response(exc, request[REQUEST_ID])
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        elif exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        headers = http_error_headers(exc.headers)
        headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
        return web.json_response(http_error_body(exc.status, message), status=exc.status, headers=headers)
    except Exception:  # noqa: BLE001
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = error_body("internal server error")
        return web.json_response(body, status=500, headers={REQUEST_ID_HEADER: request[REQUEST_ID]})
    if not response.prepared:
        response.headers.setdefault(REQUEST_ID_HEADER, request[REQUEST_ID])
    return response


def origin_middleware(origins: tuple[str, ...]) -> Callable[..., Any]:
    """CORS for allowed origins; browsers from any other origin may not POST at all.

    A web page can send a "simple" cross-site POST without a preflight. Refusing
    state-changing requests that carry a foreign ``Origin`` keeps pages the user
    visits from spending this device's compute (or approving a pairing).
    """
    allow_any = "*" in origins

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and (allow_any or origin in origins)
        if origin is not None and not allowed and request.method not in ("GET", "HEAD", "OPTIONS"):
            raise PermissionDeniedError(
                f"requests from the web origin {origin[:100]!r} are not allowed; add it to cors_origin",
                code="origin_not_allowed",
            )
        if request.method == "OPTIONS" and allowed and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if allowed and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = "*" if allow_any else origin  # type: ignore[assignment]
            response.headers["Access-Control-Allow-Headers"] = "*"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Expose-Headers"] = "*"
            if not allow_any:
                response.headers["Vary"] = "Origin"
        return response

    return middleware
