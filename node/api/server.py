"""The HTTP server around the app: idle-connection timeout and OpenAI-shaped parser errors.

aiohttp answers a request its HTTP parser rejects (a bad method, a control character in a header
value, HTTP/1.1 without ``Host``, an 8 KB request line, too many headers) before any middleware
runs, with a ``text/plain`` body and an ERROR log line carrying a full traceback. ``NodeRunner``
makes those answers the OpenAI error shape (``invalid_request_error`` with code
``bad_http_request``) and logs them as one INFO line, by using a ``RequestHandler`` subclass that
overrides ``handle_error`` for statuses below 500 (aiohttp exposes no public hook for this; the
subclass relies on ``handle_error`` and ``AppRunner._make_server``, both stable through
aiohttp 3.x). Internal errors (500) keep aiohttp's own handling: the node's error middleware
already turns every handler failure into a JSON 500 before aiohttp would see it.

Connections idle for ``IDLE_CONNECTION_TIMEOUT_S`` (no request in progress: a client that
connected and sent nothing, sent half a request line, or kept a connection open after its last
answer) are closed. A request being processed or streamed is never idle.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..common.errors import http_error_body
from ..constants import IDLE_CONNECTION_TIMEOUT_S

log = logging.getLogger(__name__)


class _NodeRequestHandler(RequestHandler):
    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        reason = (message or getattr(exc, "message", None) or str(exc or "") or "bad HTTP request").strip()
        reason = reason.splitlines()[0][:200] if reason else "bad HTTP request"
        log.info("bad HTTP request from %s answered %d: %s", request.remote, status, reason)
        body = http_error_body(status, f"the HTTP request could not be parsed: {reason}")
        body["error"].update(type="invalid_request_error", code="bad_http_request")
        response = web.json_response(body, status=status)
        response.force_close()
        return response


class _NodeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _NodeRequestHandler(self, loop=self._loop, **self._kwargs)


class NodeRunner(web.AppRunner):
    """``web.AppRunner`` with the node's connection handling (see the module docstring)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", IDLE_CONNECTION_TIMEOUT_S)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _NodeServer  # same layout: only ``__call__`` differs
        return server
