"""Forwarding: relay one OpenAI request to a paired peer over a peer link, and its answer back.

The request body goes to the peer's OpenAI surface (the request's own path) unchanged,
signed with our outbound pairing key (``dvai-sig-v1``), with ``X-DVAI-Offload: never`` and
the hop marker (``X-DVAI-Hop: <our device id>``) so the peer serves it itself. The
transport is a :class:`~node.transport.link.PeerLink` (LAN HTTP or the WebRTC data channel);
nothing here knows which, and nothing here writes HTTP: :meth:`Forwarder.open` returns a
:class:`PeerAnswer` the HTTP edge writes out.

- Streams are relayed event by event as they arrive (whole events only, never the whole
  answer), so the client sees each token as soon as the peer sends it.
- ``open`` returns only once the peer's first event (or, without streaming, its whole
  answer) is here: a peer that fails before that raises :class:`ForwardFailed` and the
  router tries elsewhere.
- A peer that fails mid-stream (link lost, no byte for ``forward_read_timeout``, stream
  cut before ``[DONE]``) ends the relayed stream with an OpenAI error event and
  ``data: [DONE]``: status ``BROKEN``.
- A client that goes away (the answer is closed before its end) cancels the link, which
  cancels the peer's generation: status ``CANCELLED``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from node.common.errors import UpstreamError
from node.common.sse import DONE_EVENT, EventSplitter, OversizeEventError, PeerEvent, encode_event
from node.config import NodeConfig
from node.constants import (
    FORWARD_ERROR_PEEK_BYTES,
    FORWARD_MAX_EVENT_BYTES,
    FORWARD_MAX_RESPONSE_BYTES,
    HOP_HEADER,
    OFFLOAD_HEADER,
    REQUEST_ID_HEADER,
    REQUEST_ID_MAX_CHARS,
)
from node.engine.base import GenerationOutcome
from node.pairing.store import Pairing
from node.security.signing import sign_with_pairing
from node.transport.link import LinkRequest, LinkResponse, PeerLink, PeerLinkError

__all__ = ["ForwardCall", "ForwardFailed", "ForwardResult", "ForwardSettings", "ForwardStatus", "ForwardTarget",
           "Forwarder", "PeerAnswer"]

log = logging.getLogger(__name__)

_DRAIN_TIMEOUT_S = 0.25
"""seconds to wait for a peer's end of stream after ``[DONE]`` before dropping the link."""


@dataclass(frozen=True, slots=True)
class ForwardTarget:
    device_id: str
    """who serves it: a peer's device id (or ``external:<name>`` for an external engine)."""
    link: PeerLink
    pairing: Pairing | None
    """signs the request (peers); None: ``bearer`` authenticates it instead (external engines)."""
    bearer: str | None = None


@dataclass(frozen=True, slots=True)
class ForwardCall:
    """The request to forward, as plain values."""

    path: str
    """path with query (``/v1/chat/completions``)."""
    body: bytes
    stream: bool
    request_id: str | None = None


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
    outcome: GenerationOutcome = field(default_factory=GenerationOutcome)
    """tokens as counted at this end (streams: text events, timed on arrival; otherwise the
    peer's ``usage``); ``outcome.decode_tok_per_s`` is the rate verification uses too."""
    first_byte_s: float | None = None
    error: str | None = None
    peer_error_code: str | None = None
    """``code`` of an error event the peer itself sent mid-stream (relayed as is)."""

    @property
    def tokens(self) -> int:
        return self.outcome.completion_tokens


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


class ForwardFailed(Exception):
    """The peer could not serve the request (before anything reached the client)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """the HTTP status the peer answered with instead of 200 (None: it did not answer)."""


Finished = Callable[["PeerAnswer"], None]


class Forwarder:
    """Sends requests to peers over their links and wraps the answers."""

    def __init__(self, *, device_id: str, settings: ForwardSettings,
                 monotonic: Callable[[], float] = time.perf_counter) -> None:
        self._device_id = device_id
        self._settings = settings
        self._monotonic = monotonic

    async def open(self, target: ForwardTarget, call: ForwardCall, *, on_finished: Finished | None = None,
                   ) -> PeerAnswer:
        """The peer's answer, once its first event (or whole answer) is here; ``ForwardFailed``
        when the peer failed before that. ``on_finished`` runs once the answer is closed."""
        started = self._monotonic()
        try:
            async with asyncio.timeout(self._settings.first_byte_timeout):
                upstream = await self._send(target, call)
                answer = PeerAnswer(target.device_id, call.stream, upstream, self._settings, self._monotonic,
                                    on_finished)
                await answer.first(started)
                return answer
        except TimeoutError:
            raise ForwardFailed(f"no answer within {self._settings.first_byte_timeout:g} s") from None
        except PeerLinkError as exc:
            raise ForwardFailed(str(exc)) from None

    async def _send(self, target: ForwardTarget, call: ForwardCall) -> LinkResponse:
        def request() -> LinkRequest:
            headers: dict[str, str] = {}
            if target.pairing is not None:
                headers = sign_with_pairing(target.pairing, self._device_id, "POST", call.path, call.body)
            elif target.bearer:
                headers["Authorization"] = f"Bearer {target.bearer}"
            headers.update({"Content-Type": "application/json", OFFLOAD_HEADER: "never",
                            HOP_HEADER: self._device_id})
            if call.request_id:
                headers[REQUEST_ID_HEADER] = call.request_id[:REQUEST_ID_MAX_CHARS]
            return LinkRequest("POST", call.path, headers, call.body)

        timeout = self._settings.connect_timeout
        try:
            upstream = await target.link.open(request(), connect_timeout=timeout)
        except PeerLinkError as exc:
            if not exc.retryable:
                raise
            # Nothing was served: try once more, with a fresh nonce (the peer may have seen the
            # first one and would call it a replay).
            upstream = await target.link.open(request(), connect_timeout=timeout)
        if upstream.status != 200:
            try:
                peek = await _read_limited(upstream, FORWARD_ERROR_PEEK_BYTES, truncate=True)
            except PeerLinkError:
                peek = b""
            finally:
                upstream.cancel()
            raise ForwardFailed(f"HTTP {upstream.status}: {_error_message(peek)}", status=upstream.status)
        return upstream


class PeerAnswer:
    """A peer's answer on its way to the client: iterate it for the bytes to send, close it
    when done (or when the client left). ``result`` holds how it went."""

    def __init__(self, device_id: str, stream: bool, upstream: LinkResponse, settings: ForwardSettings,
                 monotonic: Callable[[], float], on_finished: Finished | None) -> None:
        self.device_id = device_id
        self.stream = stream
        self.content_type = upstream.headers.get("Content-Type", "application/json")
        self.result = ForwardResult(ForwardStatus.SERVED)
        self._upstream = upstream
        self._settings = settings
        self._monotonic = monotonic
        self._on_finished = on_finished
        self._splitter = EventSplitter(max_event_bytes=FORWARD_MAX_EVENT_BYTES)
        self._tally = _Tally(monotonic, self.result.outcome)
        self._first: list[PeerEvent] = []
        self._body = b""
        self._done = False
        self._finished = False
        self._chunks: AsyncIterator[bytes] | None = None

    # -- opening -----------------------------------------------------------------------
    async def first(self, started: float) -> None:
        """Wait for the first whole event (streams) or the whole answer."""
        if self.stream:
            while True:
                chunk = await self._upstream.read_chunk()
                if not chunk:
                    self._upstream.cancel()
                    raise ForwardFailed("the peer closed the stream before its first event")
                try:
                    events = self._splitter.feed(chunk)
                except OversizeEventError as exc:
                    self._upstream.cancel()
                    raise ForwardFailed(str(exc)) from None
                if events:
                    break
            if events[0].error is not None:
                self._upstream.cancel()
                raise ForwardFailed(f"the peer answered with an error event: {_message(events[0].error)}")
            self._first = events
            self._tally.add(events)
        else:
            try:
                raw = await _read_limited(self._upstream, FORWARD_MAX_RESPONSE_BYTES)
                answer = json.loads(raw)
                if not isinstance(answer, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                self._upstream.cancel()
                raise ForwardFailed(f"{type(exc).__name__}: {exc}") from None
            self._upstream.release()
            self._body, self._done = raw, True
            raw_usage = answer.get("usage")
            usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
            self.result.outcome.completion_tokens = _int(usage.get("completion_tokens"))
            self.result.outcome.prompt_tokens = _int(usage.get("prompt_tokens"))
        self.result.first_byte_s = self._monotonic() - started

    # -- relaying ----------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._chunks is None:
            self._chunks = self._relay()
        return self._chunks

    async def _relay(self) -> AsyncIterator[bytes]:
        if not self.stream:
            yield self._body
            return
        try:
            events = self._first
            while True:
                yield b"".join(e.raw for e in events)
                if any(e.done for e in events):
                    self._done = True
                    break
                events = await self._next_events()
                self._tally.add(events)
            await self._drain()
        except ForwardFailed as exc:
            self.result.status, self.result.error = ForwardStatus.BROKEN, str(exc)
            yield _error_event(self.device_id, str(exc))

    async def _next_events(self) -> list[PeerEvent]:
        """The next whole events (at least one); ``ForwardFailed`` when the peer fails."""
        while True:
            try:
                async with asyncio.timeout(self._settings.read_timeout):
                    chunk = await self._upstream.read_chunk()
            except TimeoutError:
                raise ForwardFailed(f"the peer sent nothing for {self._settings.read_timeout:g} s") from None
            except PeerLinkError as exc:
                raise ForwardFailed(f"the peer's stream broke: {exc}") from None
            if not chunk:
                raise ForwardFailed("the peer's stream ended before [DONE]")
            try:
                events = self._splitter.feed(chunk)
            except OversizeEventError as exc:
                raise ForwardFailed(str(exc)) from None
            if events:
                return events

    async def _drain(self) -> None:
        """Read the peer's end of stream after ``[DONE]`` (normally already here), so the link
        can carry the next request instead of being dropped."""
        try:
            async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                while await self._upstream.read_chunk():
                    pass
        except (TimeoutError, PeerLinkError):
            self._done = False  # dropped instead of released

    # -- closing -----------------------------------------------------------------------
    def client_left(self) -> None:
        """The client went away: nothing more can be delivered."""
        if self.result.status is ForwardStatus.SERVED and not self._done:
            self.result.status, self.result.error = ForwardStatus.CANCELLED, "client disconnected"

    async def aclose(self) -> None:
        """Stop relaying (if not at the end), free or cancel the link, and report the result once."""
        if self._chunks is not None:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        if self._finished:
            return
        self._finished = True
        if self._done:
            self._upstream.release()  # back to the pool when drained
        else:
            self.client_left()
            self._upstream.cancel()  # the peer cancels its generation
        if self._tally.peer_error is not None and self.result.status is ForwardStatus.SERVED:
            self.result.status = ForwardStatus.BROKEN
            self.result.error = "the peer reported an error mid-stream"
            self.result.peer_error_code = self._tally.peer_error
        if self._tally.usage is not None:
            self.result.outcome.prompt_tokens = _int(self._tally.usage.get("prompt_tokens"))
            self.result.outcome.completion_tokens = (_int(self._tally.usage.get("completion_tokens"))
                                                     or self.result.outcome.completion_tokens)
        if self._on_finished is not None:
            try:
                self._on_finished(self)
            except Exception:  # noqa: BLE001 - bookkeeping never breaks the relay
                log.exception("forward bookkeeping failed")


class _Tally:
    """Text events and their arrival times at this end, plus the peer's usage and error codes."""

    __slots__ = ("_monotonic", "_outcome", "usage", "peer_error")

    def __init__(self, monotonic: Callable[[], float], outcome: GenerationOutcome) -> None:
        self._monotonic = monotonic
        self._outcome = outcome
        self.usage: dict[str, Any] | None = None
        self.peer_error: str | None = None

    def add(self, events: list[PeerEvent]) -> None:
        arrived = self._monotonic()
        for event in events:
            if event.has_text:
                self._outcome.token_at(arrived)
            if event.usage is not None:
                self.usage = event.usage
            if event.error is not None:
                self.peer_error = str(event.error.get("code") or "peer_error")[:64]


def _error_event(device_id: str, reason: str) -> bytes:
    """How a broken relay ends, like a local stream that fails: an error event, then [DONE]."""
    error = UpstreamError(f"peer {device_id[:16]} failed mid-stream: {reason}", code="peer_failed")
    return encode_event(error.to_body()) + DONE_EVENT


async def _read_limited(upstream: LinkResponse, limit: int, *, truncate: bool = False) -> bytes:
    parts: list[bytes] = []
    size = 0
    while chunk := await upstream.read_chunk():
        size += len(chunk)
        if size > limit:
            if truncate:
                parts.append(chunk)
                break
            raise ValueError(f"the peer's answer is larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)[:limit] if truncate else b"".join(parts)


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
