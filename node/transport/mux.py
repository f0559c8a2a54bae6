"""Many request/response streams over one ordered, reliable channel of frames.

``StreamMux`` sits on a ``FrameChannel`` (an aiortc data channel in production, an
in-memory pair in tests). Both ends may open streams: the end that created the
channel uses odd stream ids, the other even ones, each strictly increasing, so ids
never collide and a reused or skipped-back id is a protocol violation.

Flow control: a sender of body or response chunks waits while the channel's
``buffered_amount`` is above ``LINK_SEND_HIGH_WATER_BYTES`` and resumes on the
channel's low-water event, so a fast producer never queues more than about the high
water mark. What arrives is bounded per stream (``LINK_MAX_STREAM_BUFFER_BYTES``) and
in stream count (``LINK_MAX_STREAMS``).

The reader closes the whole link on anything that is not the protocol: an oversize
or malformed frame, a frame for a stream that was never opened, frames out of order
(a chunk before its head, a second head, a chunk after the end), a stream id of the
wrong parity or going backwards, too many streams. The node itself is unaffected:
every stream on the link fails with ``LinkClosedError`` and callers fall back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..common.errors import PayloadTooLargeError
from ..constants import (
    LINK_MAX_INBOUND_BODY_BYTES,
    LINK_MAX_STREAM_BUFFER_BYTES,
    LINK_MAX_STREAM_ID,
    LINK_MAX_STREAMS,
    LINK_SEND_HIGH_WATER_BYTES,
)
from .frames import (
    MAX_CHUNK_BYTES,
    BodyChunk,
    Cancel,
    End,
    Frame,
    Ping,
    Pong,
    RequestHead,
    ResponseChunk,
    ResponseHead,
    StreamError,
    parse_frame,
    serialize_frame,
)
from .link import PeerLinkError

__all__ = [
    "ChannelResponse",
    "FrameChannel",
    "InboundBody",
    "InboundRequest",
    "LinkClosedError",
    "LinkProtocolError",
    "ResponseWriter",
    "StreamFailedError",
    "StreamMux",
]

log = logging.getLogger(__name__)


class FrameChannel(Protocol):
    """What the multiplexer needs from a channel. The owner calls ``StreamMux.feed`` for every
    message received and ``StreamMux.on_buffered_amount_low`` on the low-water event."""

    @property
    def buffered_amount(self) -> int: ...

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class LinkClosedError(PeerLinkError):
    """The link is gone (closed, failed, or closed by us after a protocol violation)."""


class StreamFailedError(PeerLinkError):
    """The peer ended one stream with an error frame (the link itself is fine)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class LinkProtocolError(ValueError):
    """The peer broke the frame protocol; the link is closed."""


class InboundBody:
    """A request body as its chunks arrive: the handler reads it while the peer still sends.

    Bytes received but not yet read count against the link's ``LINK_MAX_INBOUND_BODY_BYTES``
    (a peer that outruns the handler by more is cut off); ``read_chunk`` raises
    ``LinkClosedError`` when the stream is cancelled, refused or the link closes."""

    def __init__(self, consumed: Callable[[int], None]) -> None:
        self._chunks: deque[bytes] = deque()
        self._consumed = consumed
        self._arrived = asyncio.Event()
        self._error: BaseException | None = None
        self.buffered = 0
        """bytes received and not yet read."""
        self.received = 0
        """bytes received so far."""
        self.ended = False
        """the peer sent the body's end."""

    @property
    def complete(self) -> bool:
        """Every byte is here (``read`` returns without waiting)."""
        return self.ended and self._error is None

    async def read_chunk(self) -> bytes:
        """The next chunk (at most ``MAX_CHUNK_BYTES``); ``b""`` at the end of the body."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self.buffered -= len(chunk)
                self._consumed(len(chunk))
                return chunk
            if self._error is not None:
                raise self._error
            if self.ended:
                return b""
            self._arrived.clear()
            await self._arrived.wait()

    async def read(self) -> bytes:
        """The whole body (for handlers that need it at once)."""
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        self._arrived.set()

    def _finish(self) -> None:
        self.ended = True
        self._arrived.set()

    def _fail(self, error: BaseException) -> int:
        """Stop the body; returns the unread bytes it dropped."""
        dropped = self.buffered
        self._chunks.clear()
        self.buffered = 0
        if self._error is None:
            self._error = error
        self._arrived.set()
        return dropped


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """A request the peer sent over the link; its body streams in as it arrives."""

    stream: int
    method: str
    path: str
    headers: Mapping[str, str]
    body: InboundBody


InboundHandler = Callable[[InboundRequest, "ResponseWriter"], Awaitable[None]]


@dataclass(slots=True)
class _Outbound:
    head: asyncio.Future[ResponseHead]
    chunks: deque[bytes] = field(default_factory=deque)
    buffered: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    error: BaseException | None = None


@dataclass(slots=True)
class _Inbound:
    head: RequestHead
    body: InboundBody
    writer: ResponseWriter
    refused: bool = False
    task: asyncio.Task[None] | None = None


class StreamMux:
    """The frame multiplexer of one link. ``initiator``: this end created the channel."""

    def __init__(
        self,
        channel: FrameChannel,
        *,
        initiator: bool,
        on_request: InboundHandler | None = None,
        on_close: Callable[[str], None] | None = None,
        max_request_body: int = LINK_MAX_STREAM_BUFFER_BYTES,
        max_streams: int = LINK_MAX_STREAMS,
        high_water: int = LINK_SEND_HIGH_WATER_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = channel
        self._on_request = on_request
        self._on_close = on_close
        self._max_request_body = max_request_body
        self._max_streams = max_streams
        self._high_water = high_water
        self._monotonic = monotonic
        self._next_id = 1 if initiator else 2
        self._peer_parity = 0 if initiator else 1
        self._last_peer_id = 0
        self._inbound_body_bytes = 0
        self._outbound: dict[int, _Outbound] = {}
        self._inbound: dict[int, _Inbound] = {}
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed: str | None = None
        self.last_activity = monotonic()
        """when a frame was last sent or received (idle detection)."""
        self.last_received = self.last_activity
        """when a frame was last received, or the peer last acknowledged bytes we sent
        (liveness while streams are open; see ``refresh_liveness``)."""
        self._peer_acks: object = None

    # -- state ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> str | None:
        return self._closed

    @property
    def open_streams(self) -> int:
        return len(self._outbound) + len(self._inbound)

    def close(self, reason: str = "closed") -> None:
        """Fail every stream, stop every inbound handler, close the channel. Idempotent."""
        if self._closed is not None:
            return
        self._closed = reason
        error = LinkClosedError(f"link closed: {reason}")
        for stream in self._outbound.values():
            stream.error = stream.error or error
            if not stream.head.done():
                stream.head.set_exception(error)
                stream.head.exception()  # retrieved: a caller that gave up must not warn
            stream.arrived.set()
        self._outbound.clear()
        for inbound in self._inbound.values():
            inbound.body._fail(error)  # noqa: SLF001 - the mux owns its bodies
            if inbound.task is not None:
                inbound.task.cancel()
        self._inbound.clear()
        self._inbound_body_bytes = 0
        for ping in self._pings.values():
            if not ping.done():
                ping.set_exception(error)
                ping.exception()
        self._pings.clear()
        self._writable.set()
        with contextlib.suppress(Exception):
            self._channel.close()
        if self._on_close is not None:
            self._on_close(reason)

    # -- channel events ---------------------------------------------------------------
    def feed(self, data: bytes | str) -> None:
        """One message from the channel. A protocol violation closes the link (never raises)."""
        if self._closed is not None:
            return
        self.last_activity = self.last_received = self._monotonic()
        try:
            if isinstance(data, str):
                raise LinkProtocolError("text message on a binary channel")
            self._dispatch(parse_frame(data))
        except ValueError as exc:  # LinkProtocolError included
            log.warning("closing link: peer broke the frame protocol (%s)", exc)
            self.close(f"protocol error: {exc}")

    def on_buffered_amount_low(self) -> None:
        self.refresh_liveness()
        self._writable.set()

    def refresh_liveness(self) -> None:
        """The peer's transport acknowledged more of what we sent (a channel with a ``peer_acks``
        counter): it is alive though it sends no frame, e.g. during a long upload ahead of its
        answer, with our pings queued behind it."""
        acks = getattr(self._channel, "peer_acks", None)
        if acks is not None and acks != self._peer_acks:
            if self._peer_acks is not None:
                self.last_received = self._monotonic()
            self._peer_acks = acks

    # -- requests we send -------------------------------------------------------------
    async def open(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> ChannelResponse:
        """Send a request and wait for the response head; raises ``LinkClosedError``,
        ``StreamFailedError`` (the peer refused it) or ``ValueError`` (a head we cannot send)."""
        self._require_open()
        if len(self._outbound) >= self._max_streams:
            raise LinkClosedError(f"{self._max_streams} streams already open on this link")
        if self._next_id > LINK_MAX_STREAM_ID:
            self.close("stream ids exhausted")
            self._require_open()
        stream_id = self._next_id
        head_frame = RequestHead(stream_id, method, path, tuple(headers.items()))
        data = serialize_frame(head_frame)  # ValueError before anything is sent
        self._next_id += 2
        if self.open_streams == 0:
            self.last_received = self._monotonic()  # liveness is judged from the first open stream on
        stream = _Outbound(asyncio.get_running_loop().create_future())
        self._outbound[stream_id] = stream
        try:
            self._send_raw(data)
            for start in range(0, len(body), MAX_CHUNK_BYTES):
                await self._wait_writable()
                if stream.ended or stream.error is not None:
                    break  # the peer answered (a 413, say) and finished before reading it all
                self._send(BodyChunk(stream_id, body[start:start + MAX_CHUNK_BYTES]))
            self._send(End(stream_id))  # (after a cut-short body too: the peer then forgets the stream)
            head = await stream.head
        except BaseException:
            self._abandon(stream_id)
            raise
        return ChannelResponse(self, stream_id, stream, head)

    async def ping(self, within: float) -> float:
        """Round-trip time in seconds of a ping frame; ``LinkClosedError`` / ``TimeoutError``."""
        self._require_open()
        nonce = secrets.randbits(63)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = future
        started = self._monotonic()
        try:
            self._send(Ping(nonce))
            async with asyncio.timeout(within):
                await future
        finally:
            self._pings.pop(nonce, None)
        return self._monotonic() - started

    # -- reading responses ------------------------------------------------------------
    async def _read(self, stream_id: int, stream: _Outbound) -> bytes:
        while True:
            if stream.chunks:
                chunk = stream.chunks.popleft()
                stream.buffered -= len(chunk)
                return chunk
            if stream.error is not None:
                raise stream.error
            if stream.ended:
                self._outbound.pop(stream_id, None)
                return b""
            stream.arrived.clear()
            await stream.arrived.wait()

    def _abandon(self, stream_id: int) -> None:
        """Forget an outbound stream; tell the peer to stop if it has not finished."""
        stream = self._outbound.pop(stream_id, None)
        if stream is None or stream.ended or stream.error is not None or self._closed is not None:
            return
        with contextlib.suppress(Exception):
            self._send(Cancel(stream_id))

    # -- dispatch ---------------------------------------------------------------------
    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, Ping):
            if self._channel.buffered_amount <= self._high_water:  # a ping flood must not queue pongs
                self._send(Pong(frame.nonce))
            return
        if isinstance(frame, Pong):
            future = self._pings.get(frame.nonce)
            if future is not None and not future.done():
                future.set_result(self._monotonic())
            return
        if frame.stream % 2 == self._peer_parity:
            self._dispatch_inbound(frame)
        else:
            self._dispatch_outbound(frame)

    def _dispatch_inbound(self, frame: Frame) -> None:
        """Frames of streams the peer opened: head (the handler starts), body, end, cancel."""
        if isinstance(frame, RequestHead):
            if frame.stream <= self._last_peer_id:
                raise LinkProtocolError(f"stream id {frame.stream} reused or out of order")
            if len(self._inbound) >= self._max_streams:
                raise LinkProtocolError(f"peer opened more than {self._max_streams} streams")
            self._last_peer_id = frame.stream
            opened = _Inbound(frame, InboundBody(self._body_consumed), ResponseWriter(self, frame.stream))
            self._inbound[frame.stream] = opened
            self._start_handler(frame.stream, opened)
            return
        if not isinstance(frame, BodyChunk | End | Cancel):
            raise LinkProtocolError(f"{type(frame).__name__} on a stream the peer opened")
        inbound = self._inbound.get(frame.stream)
        if inbound is None:
            if frame.stream <= self._last_peer_id:
                return  # a stream we already finished or refused: frames in flight
            raise LinkProtocolError(f"{type(frame).__name__} for unknown stream {frame.stream}")
        if isinstance(frame, Cancel):
            self._discard(frame.stream, LinkClosedError("the peer cancelled the stream"))
            if inbound.task is not None:
                inbound.task.cancel()
            return
        if inbound.body.ended:
            raise LinkProtocolError(f"{type(frame).__name__} after the end of stream {frame.stream}")
        if isinstance(frame, End):
            inbound.body._finish()  # noqa: SLF001 - the mux owns its bodies
            if inbound.task is None:
                self._inbound.pop(frame.stream, None)
            return
        if inbound.refused:
            return  # answered already; the rest of the body is dropped as it arrives
        if inbound.body.received + len(frame.data) > self._max_request_body:
            self._refuse_too_large(frame.stream, inbound)
            return
        inbound.body._feed(frame.data)  # noqa: SLF001
        self._inbound_body_bytes += len(frame.data)
        if self._inbound_body_bytes > LINK_MAX_INBOUND_BODY_BYTES:
            raise LinkProtocolError(f"peer sent {LINK_MAX_INBOUND_BODY_BYTES} bytes of bodies faster than "
                                    "they were read")

    def _body_consumed(self, size: int) -> None:
        self._inbound_body_bytes -= size

    def _discard(self, stream_id: int, error: BaseException) -> None:
        """Forget an inbound stream and the unread part of its body."""
        inbound = self._inbound.pop(stream_id, None)
        if inbound is not None:
            self._inbound_body_bytes -= inbound.body._fail(error)  # noqa: SLF001

    def _refuse_too_large(self, stream_id: int, inbound: _Inbound) -> None:
        """The body crossed the size cap: stop the handler, answer 413 as the HTTP API does."""
        inbound.refused = True
        self._inbound_body_bytes -= inbound.body._fail(  # noqa: SLF001
            LinkClosedError("the request body is too large"))
        if inbound.task is not None:  # the entry stays until the End frame: the rest is dropped quietly
            inbound.task.cancel()
            inbound.task = None
        error = PayloadTooLargeError(f"request body is larger than {self._max_request_body} bytes")
        writer = inbound.writer
        if writer.finished:
            return
        if writer.head_sent:
            writer.finished = True
            self._send(StreamError(stream_id, "payload_too_large", error.message))
            return
        writer.head(413, {"Content-Type": "application/json"})
        writer.finished = True
        self._send(ResponseChunk(stream_id, json.dumps(error.to_body()).encode()))
        self._send(End(stream_id))

    def _dispatch_outbound(self, frame: Frame) -> None:
        """Frames of streams we opened: response head, chunks, end, error."""
        if not isinstance(frame, ResponseHead | ResponseChunk | End | StreamError):
            raise LinkProtocolError(f"{type(frame).__name__} on a stream we opened")
        stream = self._outbound.get(frame.stream)
        if stream is None:
            if frame.stream < self._next_id:
                return  # cancelled or finished by us: frames in flight
            raise LinkProtocolError(f"{type(frame).__name__} for unknown stream {frame.stream}")
        if stream.ended or stream.error is not None:
            raise LinkProtocolError(f"{type(frame).__name__} after the end of stream {frame.stream}")
        if isinstance(frame, StreamError):
            error = StreamFailedError(frame.code, frame.message)
            stream.error = error
            if not stream.head.done():
                stream.head.set_exception(error)
            stream.arrived.set()
            return
        if isinstance(frame, ResponseHead):
            if stream.head.done():
                raise LinkProtocolError(f"second response head on stream {frame.stream}")
            stream.head.set_result(frame)
            return
        if not stream.head.done():
            raise LinkProtocolError(f"{type(frame).__name__} before the response head on stream {frame.stream}")
        if isinstance(frame, End):
            stream.ended = True
        else:
            stream.buffered += len(frame.data)
            if stream.buffered > LINK_MAX_STREAM_BUFFER_BYTES:
                stream.error = StreamFailedError("buffer_full", "the peer sent more than we could buffer")
                self._outbound.pop(frame.stream, None)
                self._send(Cancel(frame.stream))
            else:
                stream.chunks.append(frame.data)
        stream.arrived.set()

    def _start_handler(self, stream_id: int, inbound: _Inbound) -> None:
        if self._on_request is None:
            inbound.refused = True  # the body is dropped as it arrives; the entry goes at its end
            self._send(StreamError(stream_id, "not_serving", "this node serves no requests over links"))
            return
        request = InboundRequest(stream_id, inbound.head.method, inbound.head.path, dict(inbound.head.headers),
                                 inbound.body)
        inbound.task = asyncio.get_running_loop().create_task(
            self._run_handler(request, inbound.writer), name=f"link-stream-{stream_id}")

    async def _run_handler(self, request: InboundRequest, writer: ResponseWriter) -> None:
        assert self._on_request is not None
        try:
            await self._on_request(request, writer)
            if not writer.finished:
                await writer.fail("internal_error", "the handler ended without an answer")
        except asyncio.CancelledError:
            pass  # the peer cancelled or the link closed; nothing more to send
        except LinkClosedError:
            pass
        except Exception as exc:  # noqa: BLE001 - one stream's failure never harms the link
            log.exception("link stream %d failed", request.stream)
            if not writer.finished:
                with contextlib.suppress(Exception):
                    await writer.fail("internal_error", f"{type(exc).__name__}")
        finally:
            inbound = self._inbound.get(request.stream)
            if inbound is not None and not inbound.refused:
                if inbound.body.ended:
                    self._discard(request.stream, LinkClosedError("the stream is finished"))
                else:  # answered before the body's end: drop the rest of it as it arrives
                    inbound.refused = True
                    inbound.task = None
                    self._inbound_body_bytes -= inbound.body._fail(  # noqa: SLF001
                        LinkClosedError("the stream is finished"))

    # -- sending ----------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._closed is not None:
            raise LinkClosedError(f"link closed: {self._closed}")

    def _send(self, frame: Frame) -> None:
        self._send_raw(serialize_frame(frame))

    def _send_raw(self, data: bytes) -> None:
        self._require_open()
        try:
            self._channel.send(data)
        except Exception as exc:  # noqa: BLE001 - aiortc raises InvalidStateError etc.
            self.close(f"send failed: {type(exc).__name__}")
            raise LinkClosedError(f"link closed: send failed ({type(exc).__name__})") from exc
        self.last_activity = self._monotonic()

    async def _wait_writable(self) -> None:
        """Return once the channel's queue is at or under the high-water mark."""
        while self._closed is None and self._channel.buffered_amount > self._high_water:
            self._writable.clear()
            await self._writable.wait()
        self._require_open()


class ChannelResponse:
    """The answer to a request we sent: status and headers now, the body chunk by chunk."""

    def __init__(self, mux: StreamMux, stream_id: int, stream: _Outbound, head: ResponseHead) -> None:
        self._mux = mux
        self._stream_id = stream_id
        self._stream = stream
        self.status = head.status
        self.headers: Mapping[str, str] = dict(head.headers)

    async def read_chunk(self) -> bytes:
        """The next bytes of the body; ``b""`` at the end. ``LinkClosedError`` /
        ``StreamFailedError`` when the stream breaks."""
        return await self._mux._read(self._stream_id, self._stream)  # noqa: SLF001 - one owner

    def release(self) -> None:
        """Finished (the body was read to its end, or we stop reading a finished answer)."""
        self._mux._abandon(self._stream_id)  # noqa: SLF001

    def cancel(self) -> None:
        """Abandon the stream: the peer gets a cancel frame and stops generating."""
        self._mux._abandon(self._stream_id)  # noqa: SLF001


class ResponseWriter:
    """How an inbound handler answers: ``head`` once, ``write`` any number of times, ``end``
    (or ``fail`` at any point). Writes wait for the channel to drain (flow control)."""

    def __init__(self, mux: StreamMux, stream_id: int) -> None:
        self._mux = mux
        self._stream_id = stream_id
        self.head_sent = False
        self.finished = False

    def head(self, status: int, headers: Mapping[str, str]) -> None:
        if self.head_sent or self.finished:
            raise RuntimeError("the response head was already sent")
        self._mux._send(ResponseHead(self._stream_id, status, tuple(headers.items())))  # noqa: SLF001
        self.head_sent = True

    async def write(self, data: bytes) -> None:
        if not self.head_sent or self.finished:
            raise RuntimeError("write needs a sent head and an unfinished stream")
        for start in range(0, len(data), MAX_CHUNK_BYTES):
            await self._mux._wait_writable()  # noqa: SLF001
            self._mux._send(ResponseChunk(self._stream_id, data[start:start + MAX_CHUNK_BYTES]))  # noqa: SLF001

    async def end(self) -> None:
        if not self.head_sent or self.finished:
            raise RuntimeError("end needs a sent head and an unfinished stream")
        self.finished = True
        self._mux._send(End(self._stream_id))  # noqa: SLF001

    async def fail(self, code: str, message: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._mux._send(StreamError(self._stream_id, code, message[:1024]))  # noqa: SLF001
