"""Forwarding: relay one OpenAI request to a paired peer and its answer back to the client.

The request body goes to the peer's OpenAI surface (``<peer base URL>`` + the request's
own path) unchanged, signed with our outbound pairing key (``dvai-sig-v1``), with
``X-DVAI-Offload: never`` and the hop marker (``X-DVAI-Hop: <our device id>``) so the
peer serves it itself. The answer carries ``X-DVAI-Served-By: <peer device id>``.

- Streams are relayed event by event as they arrive (whole events only, never the whole
  answer), so the client sees each token as soon as the peer sends it.
- Nothing reaches the client until the peer's first event (or, without streaming, its
  whole answer) is here: a peer that fails before that returns ``FAILED`` and the router
  tries elsewhere.
- A peer that fails mid-stream (connection lost, no byte for ``forward_read_timeout``,
  stream cut before ``[DONE]``) ends the client's stream with an OpenAI error event and
  ``data: [DONE]``: status ``BROKEN``.
- A client that goes away closes the upstream connection, which cancels the peer's
  generation (its handler is cancelled with the connection): status ``CANCELLED``, or
  ``asyncio.CancelledError`` propagating when aiohttp cancels the handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
from aiohttp import web

from node.config import NodeConfig
from node.constants import (
    FORWARD_MAX_RESPONSE_BYTES,
    HOP_HEADER,
    OFFLOAD_HEADER,
    REQUEST_ID_HEADER,
    SERVED_BY_HEADER,
)
from node.errors import UpstreamError
from node.security.pairing import Pairing
from node.security.signing import path_with_query_of, sign_request_headers

from .events import DONE_EVENT, SSE_HEADERS, EventSplitter, OversizeEventError, PeerEvent, encode_event

__all__ = ["ForwardResult", "ForwardSettings", "ForwardStatus", "ForwardTarget", "Forwarder"]

log = logging.getLogger(__name__)

_ERROR_BODY_PEEK = 4096
"""bytes of a peer's error answer read for the log line."""
_DRAIN_TIMEOUT_S = 0.25
"""seconds to wait for a peer's end of stream after ``[DONE]`` before dropping the connection."""


@dataclass(frozen=True, slots=True)
class ForwardTarget:
    device_id: str
    base_url: str
    """the peer's OpenAI base URL (``http://host:port/v1``)."""
    pairing: Pairing


class ForwardStatus(StrEnum):
    SERVED = "served"
    FAILED = "failed"
    """before the first byte reached the client: the request can go elsewhere."""
    BROKEN = "broken"
    """mid-stream: the client got an error event."""
    CANCELLED = "cancelled"
    """the client went away."""


@dataclass(slots=True)
class ForwardResult:
    status: ForwardStatus
    response: web.StreamResponse | None = None
    """the answer to return from the handler (``None`` when ``FAILED``)."""
    tokens: int = 0
    """generated tokens seen (streams: content events; otherwise the peer's ``usage``)."""
    prompt_tokens: int = 0
    decode_seconds: float = 0.0
    """first to last token at this end, scaled so ``tokens / decode_seconds`` is the
    ``(n - 1) / (t_last - t_first)`` rate verification uses; 0 when not measured."""
    first_byte_s: float | None = None
    error: str | None = None
    peer_error_code: str | None = None
    """``code`` of an error event the peer itself sent mid-stream (relayed as is)."""


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    connect_timeout: float = 3.0
    first_byte_timeout: float = 90.0
    """seconds until the peer's first event (streams) or whole answer (otherwise)."""
    read_timeout: float = 30.0
    """seconds without a byte mid-answer before the peer counts as failed."""

    @classmethod
    def from_config(cls, config: NodeConfig) -> ForwardSettings:
        offload = config.offload
        return cls(
            connect_timeout=offload.forward_connect_timeout,
            first_byte_timeout=config.generation_timeout + offload.forward_read_timeout,
            read_timeout=offload.forward_read_timeout,
        )


class _PeerFailure(Exception):
    """The peer could not serve the request (before anything reached the client)."""


class Forwarder:
    """Relays requests to peers over the node's shared HTTP client."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        device_id: str,
        settings: ForwardSettings,
        monotonic: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._session = session
        self._device_id = device_id
        self._settings = settings
        self._monotonic = monotonic

    async def forward(
        self,
        request: web.Request,
        target: ForwardTarget,
        body: bytes,
        *,
        stream: bool,
        on_first_byte: Callable[[], None] | None = None,
    ) -> ForwardResult:
        url = target.base_url.rstrip("/").removesuffix("/v1") + request.raw_path

        def sign() -> dict[str, str]:
            return sign_request_headers(target.pairing.key, self._device_id, target.pairing.app_id, "POST",
                                        path_with_query_of(url), body)

        headers = SignedHeaders(sign)
        headers.extra.update({"Content-Type": "application/json", OFFLOAD_HEADER: "never",
                        HOP_HEADER: self._device_id})
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id:
            headers.extra[REQUEST_ID_HEADER] = request_id[:128]
        if stream:
            return await self._stream(request, target, url, headers, body, on_first_byte)
        return await self._whole(target, url, headers, body, on_first_byte)

    # -- streams ---------------------------------------------------------------------
    async def _stream(self, request: web.Request, target: ForwardTarget, url: str, headers: SignedHeaders,
                      body: bytes, on_first_byte: Callable[[], None] | None) -> ForwardResult:
        started = self._monotonic()
        splitter = EventSplitter()
        try:
            upstream, first = await self._open_stream(url, headers, body, splitter)
        except _PeerFailure as exc:
            return ForwardResult(ForwardStatus.FAILED, error=str(exc))
        tally = _Tally(self._monotonic)
        tally.add(first)
        result = ForwardResult(ForwardStatus.SERVED, first_byte_s=self._monotonic() - started)
        response = web.StreamResponse(headers={**SSE_HEADERS, SERVED_BY_HEADER: target.device_id})
        result.response = response
        done = False
        try:
            await response.prepare(request)
            await response.write(b"".join(e.raw for e in first))
            if on_first_byte is not None:
                on_first_byte()
            done = any(e.done for e in first)
            while not done:
                events = await self._next_events(upstream, splitter)
                tally.add(events)
                await response.write(b"".join(e.raw for e in events))
                done = any(e.done for e in events)
            await response.write_eof()
            await _drain(upstream)
        except _PeerFailure as exc:
            result.status, result.error = ForwardStatus.BROKEN, str(exc)
            await _end_with_error(response, target.device_id, str(exc))
        except ConnectionResetError:
            result.status, result.error = ForwardStatus.CANCELLED, "client disconnected"
        finally:
            if done:
                upstream.release()  # back to the pool when drained (closed otherwise)
            else:
                upstream.close()  # drops the connection: the peer cancels its generation
        tally.fill(result)
        if tally.peer_error is not None and result.status is ForwardStatus.SERVED:
            result.status, result.error = ForwardStatus.BROKEN, "the peer reported an error mid-stream"
            result.peer_error_code = tally.peer_error
        return result

    async def _open_stream(self, url: str, headers: SignedHeaders, body: bytes,
                           splitter: EventSplitter) -> tuple[aiohttp.ClientResponse, list[PeerEvent]]:
        """POST and wait for the peer's first whole event."""
        upstream: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self._settings.first_byte_timeout):
                upstream = await self._post(url, headers, body)
                while True:
                    chunk = await upstream.content.readany()
                    if not chunk:
                        raise _PeerFailure("the peer closed the stream before its first event")
                    events = splitter.feed(chunk)
                    if events:
                        break
            if events[0].error is not None:
                raise _PeerFailure(f"the peer answered with an error event: {_message(events[0].error)}")
            return upstream, events
        except TimeoutError:
            _close(upstream)
            raise _PeerFailure(f"no answer within {self._settings.first_byte_timeout:g} s") from None
        except (aiohttp.ClientError, OSError, OversizeEventError) as exc:
            _close(upstream)
            raise _PeerFailure(_describe(exc)) from None
        except BaseException:
            _close(upstream)
            raise

    async def _next_events(self, upstream: aiohttp.ClientResponse, splitter: EventSplitter) -> list[PeerEvent]:
        """The next whole events (at least one); ``_PeerFailure`` when the peer fails."""
        while True:
            try:
                async with asyncio.timeout(self._settings.read_timeout):
                    chunk = await upstream.content.readany()
            except TimeoutError:
                raise _PeerFailure(f"the peer sent nothing for {self._settings.read_timeout:g} s") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise _PeerFailure(f"the peer's stream broke: {_describe(exc)}") from None
            if not chunk:
                raise _PeerFailure("the peer's stream ended before [DONE]")
            try:
                events = splitter.feed(chunk)
            except OversizeEventError as exc:
                raise _PeerFailure(str(exc)) from None
            if events:
                return events

    # -- whole answers ---------------------------------------------------------------
    async def _whole(self, target: ForwardTarget, url: str, headers: SignedHeaders, body: bytes,
                     on_first_byte: Callable[[], None] | None) -> ForwardResult:
        started = self._monotonic()
        upstream: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self._settings.first_byte_timeout):
                upstream = await self._post(url, headers, body)
                raw = await _read_limited(upstream, FORWARD_MAX_RESPONSE_BYTES)
            answer = json.loads(raw)
            if not isinstance(answer, dict):
                raise ValueError("not a JSON object")
        except TimeoutError:
            return ForwardResult(ForwardStatus.FAILED,
                                 error=f"no answer within {self._settings.first_byte_timeout:g} s")
        except _PeerFailure as exc:
            return ForwardResult(ForwardStatus.FAILED, error=str(exc))
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return ForwardResult(ForwardStatus.FAILED, error=_describe(exc))
        finally:
            _close(upstream)
        if on_first_byte is not None:
            on_first_byte()
        raw_usage = answer.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        content_type = upstream.headers.get("Content-Type", "application/json") if upstream else "application/json"
        response = web.Response(body=raw, status=200,
                                headers={"Content-Type": content_type, SERVED_BY_HEADER: target.device_id})
        return ForwardResult(ForwardStatus.SERVED, response, tokens=_int(usage.get("completion_tokens")),
                             prompt_tokens=_int(usage.get("prompt_tokens")),
                             first_byte_s=self._monotonic() - started)

    async def _post(self, url: str, headers: SignedHeaders, body: bytes,
                    resign: Callable[[], dict[str, str]] | None = None) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._settings.connect_timeout)
        try:
            upstream = await self._session.post(url, data=body, headers=headers.value, timeout=timeout)
        except aiohttp.ServerDisconnectedError:
            # A pooled keep-alive connection the peer had closed (it restarted, or its idle
            # timeout won the race): nothing was served on it, so try once on a fresh one,
            # with a fresh nonce (the peer may have seen the first one and would call it a replay).
            upstream = await self._session.post(url, data=body, headers=headers.resigned(), timeout=timeout)
        if upstream.status != 200:
            try:
                peek = await upstream.content.read(_ERROR_BODY_PEEK)
            except (aiohttp.ClientError, OSError):
                peek = b""
            finally:
                upstream.close()
            raise _PeerFailure(f"HTTP {upstream.status}: {_error_message(peek)}")
        return upstream


class SignedHeaders:
    """A forwarded request's headers: the signature, which can be redone with a fresh nonce,
    plus the fixed ones (``extra``)."""

    def __init__(self, sign: Callable[[], dict[str, str]]) -> None:
        self._sign = sign
        self._signature = sign()
        self.extra: dict[str, str] = {}

    @property
    def value(self) -> dict[str, str]:
        return {**self._signature, **self.extra}

    def resigned(self) -> dict[str, str]:
        self._signature = self._sign()
        return self.value


class _Tally:
    """Tokens and their arrival times at this end, plus the peer's usage and error codes."""

    __slots__ = ("_monotonic", "tokens", "first", "last", "usage", "peer_error")

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self.tokens = 0
        self.first: float | None = None
        self.last: float | None = None
        self.usage: dict[str, Any] | None = None
        self.peer_error: str | None = None

    def add(self, events: list[PeerEvent]) -> None:
        arrived = self._monotonic()
        for event in events:
            if event.has_text:
                self.tokens += 1
                self.first = arrived if self.first is None else self.first
                self.last = arrived
            if event.usage is not None:
                self.usage = event.usage
            if event.error is not None:
                self.peer_error = str(event.error.get("code") or "peer_error")[:64]

    def fill(self, result: ForwardResult) -> None:
        usage = self.usage or {}
        result.tokens = _int(usage.get("completion_tokens")) or self.tokens
        result.prompt_tokens = _int(usage.get("prompt_tokens"))
        if self.tokens >= 2 and self.first is not None and self.last is not None and self.last > self.first:
            # PeerAttempt.succeeded computes tokens / decode_seconds: scale so that equals
            # (n - 1) / (t_last - t_first), the same measure verification uses.
            result.decode_seconds = (self.last - self.first) * self.tokens / (self.tokens - 1)


async def _end_with_error(response: web.StreamResponse, device_id: str, reason: str) -> None:
    """Close a broken relay the way a local stream ends on an error: an error event, then [DONE]."""
    error = UpstreamError(f"peer {device_id[:16]} failed mid-stream: {reason}", code="peer_failed")
    try:
        await response.write(encode_event(error.to_body()) + DONE_EVENT)
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass  # the client is gone as well


async def _drain(upstream: aiohttp.ClientResponse) -> None:
    """Read the peer's end of stream after ``[DONE]`` (normally already here), so that the
    connection goes back to the pool instead of being closed: the next request skips a connect."""
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            while await upstream.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError, OSError):
        upstream.close()


async def _read_limited(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _PeerFailure(f"the peer's answer is larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _close(upstream: aiohttp.ClientResponse | None) -> None:
    if upstream is not None:
        upstream.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _message(error: dict[str, Any]) -> str:
    return str(error.get("message") or error.get("code") or "error")[:200]


def _error_message(peek: bytes) -> str:
    try:
        body = json.loads(peek)
        return _message(body["error"])
    except (ValueError, KeyError, TypeError):
        return peek[:200].decode("utf-8", "replace") or "(no body)"


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
