"""Writing answers out over HTTP: local streams as server-sent events, and peers' answers.

Local streams are ``data: {json}\\n\\n`` events closed by ``data: [DONE]``; a peer's answer
(:class:`~node.offload.forward.PeerAnswer`) is already encoded and is written as it arrives.
The codec (encoding, the DONE marker, headers) is ``node/common/sse.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientConnectionResetError, web

from ..common.errors import DVAIError, error_body
from ..common.sse import DONE_EVENT, SSE_HEADERS, encode_event
from ..constants import REQUEST_ID_HEADER, SERVED_BY_HEADER
from ..engine.record import RequestRecord
from ..offload.forward import PeerAnswer
from .middlewares import REQUEST_ID

log = logging.getLogger(__name__)

def encode_frame(payload: dict[str, Any], *, named: bool = False) -> bytes:
    """One SSE frame; ``named`` adds the ``event:`` line the Responses API sends (its ``type``)."""
    data = encode_event(payload)
    kind = payload.get("type")
    if named and isinstance(kind, str):
        return b"event: " + kind.encode() + b"\n" + data
    return data


def error_frame(error: dict[str, Any], *, named: bool) -> bytes:
    """The error frame: chat's ``{"error": {…}}``, or the Responses API's ``{"type": "error", …}``."""
    if named:
        return encode_frame({"type": "error", "code": error.get("code"), "message": error.get("message"),
                             "param": error.get("param")}, named=True)
    return encode_event({"error": error})


async def stream_events(
    request: web.Request,
    events: AsyncIterator[dict[str, Any]],
    *,
    headers: dict[str, str] | None = None,
    record: RequestRecord | None = None,
    named_events: bool = False,
) -> web.StreamResponse:
    """Relay ``events`` as SSE (``named_events``: with ``event:`` lines and no ``[DONE]``).

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
                await response.write(encode_frame(first, named=named_events))
            async for event in iterator:
                await response.write(encode_frame(event, named=named_events))
        except (ConnectionResetError, ClientConnectionResetError):
            # The client left: nothing more can be written; the finally below stops the source.
            if record is not None:
                record.failed("client_closed_request")
            return response
        except DVAIError as exc:
            log.warning("stream ended with an error: %s", exc.message)
            if record is not None:
                record.failed(str(exc.code))
            await response.write(error_frame(exc.to_body()["error"], named=named_events))
        except Exception:  # noqa: BLE001 - the client gets a clean error event, the log the trace
            log.exception("stream failed")
            if record is not None:
                record.failed("internal_error")
            await response.write(error_frame(error_body("internal error while streaming")["error"],
                                             named=named_events))
        if not named_events:
            await response.write(DONE_EVENT)
        await response.write_eof()
        return response
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]


async def write_peer_answer(request: web.Request, answer: PeerAnswer) -> web.StreamResponse:
    """Write a peer's answer out as it arrives, with ``X-DVAI-Served-By`` naming the peer.

    A client that goes away cancels the peer's generation (the answer is closed early)."""
    headers = {SERVED_BY_HEADER: answer.device_id}
    request_id = request.get(REQUEST_ID)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    try:
        if not answer.stream:
            body = b"".join([chunk async for chunk in answer])
            return web.Response(body=body, status=200, headers={"Content-Type": answer.content_type, **headers})
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await response.prepare(request)
        try:
            async for chunk in answer:
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, ClientConnectionResetError):
            answer.client_left()
        return response
    finally:
        await answer.aclose()
