"""One audit row per inference request, served or refused: an aiohttp middleware.

Place it *outside* the security middleware (so refusals are recorded too) and run the security
middleware with ``render_errors=False`` (so the refusal's error ``code`` reaches this one)::

    middlewares=[error_middleware, cors, make_audit_middleware(audit, ...), make_security_middleware(...,
                 render_errors=False)]

Handlers add what only they know to ``request[AUDIT_DETAILS_KEY]`` (a dict): ``model_requested``,
``model_served``, ``prompt_tokens``, ``completion_tokens``, ``served_by`` (``local`` or a device
id), ``error_code`` (for an error reported inside a stream that already answered 200).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..constants import REQUEST_ID_HEADER
from ..errors import DVAIError
from .audit import AuditLog, AuditRow
from .guard import attribution_of, audit_peer_of

INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

_HAS_REQUEST_KEY = hasattr(web, "RequestKey")
AUDIT_DETAILS_KEY: Any = web.RequestKey("dvai_audit_details", dict) if _HAS_REQUEST_KEY else "dvai_audit_details"
"""``request[AUDIT_DETAILS_KEY]``: a dict the handler fills in (see the module docstring)."""

CLIENT_CLOSED_STATUS = 499
"""status recorded when the client went away before the answer was complete (nginx's convention)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _header_request_id(request: web.Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER, "")


def make_audit_middleware(
    audit: AuditLog,
    *,
    paths: Collection[str] = INFERENCE_PATHS,
    request_id: Callable[[web.Request], str] = _header_request_id,
    now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
) -> Middleware:
    """Record every request to ``paths`` once it is answered (streams: once fully written)."""
    watched = frozenset(paths)

    @web.middleware
    async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in watched:
            return await handler(request)
        details: dict[str, Any] = {}
        request[AUDIT_DETAILS_KEY] = details
        arrived_ms, started = now_ms(), time.monotonic()
        outcome = HandlerOutcome()
        try:
            return await outcome.run(handler, request)
        finally:
            audit.record(_row(request, details, arrived_ms, started, outcome.status, outcome.code, request_id))

    return audit_middleware


@dataclass(slots=True)
class HandlerOutcome:
    """How a request ended, as middlewares that observe it (audit, metrics) need to know it."""

    status: int = 500
    code: str | None = "internal_error"
    response: web.StreamResponse | None = None

    async def run(self, handler: Handler, request: web.Request) -> web.StreamResponse:
        """Call ``handler``, recording the status and error code whether it answers or raises."""
        try:
            self.response = await handler(request)
            self.status, self.code = self.response.status, None
            return self.response
        except DVAIError as exc:
            self.status, self.code = exc.status, str(exc.code)
            raise
        except web.HTTPException as exc:
            self.status, self.code = exc.status, None
            raise
        except asyncio.CancelledError:
            self.status, self.code = CLIENT_CLOSED_STATUS, "client_closed_request"
            raise


def _row(request: web.Request, details: dict[str, Any], arrived_ms: int, started: float, status: int,
         code: str | None, request_id: Callable[[web.Request], str]) -> AuditRow:
    return AuditRow(
        ts=arrived_ms,
        request_id=request_id(request),
        app_id=attribution_of(request).app_id,
        peer_device_id=audit_peer_of(request),
        endpoint=request.path,
        status=status,
        model_requested=_text(details.get("model_requested")),
        model_served=_text(details.get("model_served")),
        prompt_tokens=_count(details.get("prompt_tokens")),
        completion_tokens=_count(details.get("completion_tokens")),
        latency_ms=round((time.monotonic() - started) * 1000, 3),
        served_by=_text(details.get("served_by")) or "local",
        error_code=code or _text(details.get("error_code")),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
