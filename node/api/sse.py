"""Server-sent events: ``data: {json}\\n\\n`` frames closed by ``data: [DONE]``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientConnectionResetError, web

from ..constants import REQUEST_ID_HEADER
from ..errors import DVAIError
from .middlewares import REQUEST_ID

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
DONE = b"data: [DONE]\n\n"


def encode_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def stream_events(
    request: web.Request,
    events: AsyncIterator[dict[str, Any]],
    *,
    headers: dict[str, str] | None = None,
    details: dict[str, object] | None = None,
) -> web.StreamResponse:
    """Relay ``events`` as SSE.

    The first event is awaited before the response starts, so errors raised
    while queueing or loading still become a normal JSON error with the right
    status. An error after that is sent as an ``error`` event and the stream is
    closed cleanly.
    """
    iterator = aiter(events)
    try:
        try:
            first: dict[str, Any] | None = await anext(iterator)
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(headers={**SSE_HEADERS, **(headers or {})})
        request_id = request.get(REQUEST_ID)
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        await response.prepare(request)
        try:
            if first is not None:
                await response.write(encode_event(first))
            async for event in iterator:
                await response.write(encode_event(event))
        except (ConnectionResetError, ClientConnectionResetError):
            # The client left: nothing more can be written; the finally below stops the source.
            if details is not None:
                details["error_code"] = "client_closed_request"
            return response
        except DVAIError as exc:
            log.warning("stream ended with an error: %s", exc.message)
            if details is not None:
                details["error_code"] = str(exc.code)
            await response.write(encode_event(exc.to_body()))
        except Exception:  # noqa: BLE001 - the client gets a clean error event, the log the trace
            log.exception("stream failed")
            if details is not None:
                details["error_code"] = "internal_error"
            await response.write(
                encode_event({"error": {"message": "internal error while streaming", "type": "server_error",
                                        "code": "internal_error", "param": None}})
            )
        await response.write(DONE)
        await response.write_eof()
        return response
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]
