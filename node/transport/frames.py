"""The internet path's frame codec: msgpack maps with a type tag and a stream id.

One reliable, ordered data channel carries many request/response streams between
two paired nodes. Every message on it is one frame, a msgpack map::

    {"t": <type tag>, "s": <stream id>, ...fields of that type}

=================  ===  ======================================  =========================
frame              t    fields                                  sent by
=================  ===  ======================================  =========================
RequestHead        1    m method, p path-with-query, h headers  requester, opens a stream
BodyChunk          2    d bytes                                 requester
ResponseHead       3    c status, h headers                     responder
ResponseChunk      4    d bytes                                 responder
End                5    (none)                                  either: its side is done
StreamError        6    e code, x message                       responder: stream failed
Cancel             7    (none)                                  requester: abandon stream
Ping / Pong        8/9  n nonce (stream id 0)                   either
=================  ===  ======================================  =========================

Each serialized frame is at most ``MAX_FRAME_BYTES`` (64 KiB); bodies travel as
chunks of at most ``MAX_CHUNK_BYTES``. ``parse_frame`` checks the length first,
then the msgpack structure, then every field's type and range, and raises
``ValueError`` for anything else: a peer cannot make it raise another exception.
Unknown map keys are ignored (room for later fields); unknown type tags are not.
The protocol, with the stream rules the multiplexer enforces, is in
``docs/internet-path.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import msgpack

from ..constants import (
    LINK_MAX_CHUNK_BYTES,
    LINK_MAX_ERROR_MESSAGE_CHARS,
    LINK_MAX_FRAME_BYTES,
    LINK_MAX_HEADER_BYTES,
    LINK_MAX_HEADERS,
    LINK_MAX_PATH_CHARS,
    LINK_MAX_STREAM_ID,
)

__all__ = [
    "BodyChunk",
    "Cancel",
    "End",
    "Frame",
    "FrameType",
    "MAX_CHUNK_BYTES",
    "MAX_FRAME_BYTES",
    "Ping",
    "Pong",
    "RequestHead",
    "ResponseChunk",
    "ResponseHead",
    "StreamError",
    "parse_frame",
    "serialize_frame",
]

MAX_FRAME_BYTES = LINK_MAX_FRAME_BYTES
MAX_CHUNK_BYTES = LINK_MAX_CHUNK_BYTES

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")
_CODE_RE = re.compile(r"^[a-z0-9_]{1,64}$")
_BAD_VALUE_RE = re.compile(r"[\r\n\x00]")


class FrameType(IntEnum):
    REQUEST_HEAD = 1
    BODY_CHUNK = 2
    RESPONSE_HEAD = 3
    RESPONSE_CHUNK = 4
    END = 5
    ERROR = 6
    CANCEL = 7
    PING = 8
    PONG = 9


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RequestHead:
    type: ClassVar[FrameType] = FrameType.REQUEST_HEAD
    stream: int
    method: str
    path: str
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class BodyChunk:
    type: ClassVar[FrameType] = FrameType.BODY_CHUNK
    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ResponseHead:
    type: ClassVar[FrameType] = FrameType.RESPONSE_HEAD
    stream: int
    status: int
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class ResponseChunk:
    type: ClassVar[FrameType] = FrameType.RESPONSE_CHUNK
    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    type: ClassVar[FrameType] = FrameType.END
    stream: int


@dataclass(frozen=True, slots=True)
class StreamError:
    type: ClassVar[FrameType] = FrameType.ERROR
    stream: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Cancel:
    type: ClassVar[FrameType] = FrameType.CANCEL
    stream: int


@dataclass(frozen=True, slots=True)
class Ping:
    type: ClassVar[FrameType] = FrameType.PING
    nonce: int
    stream: int = 0


@dataclass(frozen=True, slots=True)
class Pong:
    type: ClassVar[FrameType] = FrameType.PONG
    nonce: int
    stream: int = 0


Frame = RequestHead | BodyChunk | ResponseHead | ResponseChunk | End | StreamError | Cancel | Ping | Pong


_MAX_TAG = max(FrameType)
_CHUNK_TAG: dict[type, int] = {ResponseChunk: int(FrameType.RESPONSE_CHUNK), BodyChunk: int(FrameType.BODY_CHUNK)}


def _packb(wire: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(wire, use_bin_type=True)
    return packed


# --------------------------------------------------------------------------
# Serialize


def serialize_frame(frame: Frame) -> bytes:
    """The frame's msgpack bytes; ValueError when a field is invalid or the frame is too large."""
    kind = type(frame)
    if kind is ResponseChunk or kind is BodyChunk:  # one per token: the checks below, inline
        stream, data = frame.stream, frame.data  # type: ignore[union-attr]
        if type(stream) is int and 1 <= stream <= LINK_MAX_STREAM_ID and type(data) is bytes \
                and 0 < len(data) <= MAX_CHUNK_BYTES:
            packed: bytes = _packb({"t": _CHUNK_TAG[kind], "s": stream, "d": data})
            return packed  # at most MAX_CHUNK_BYTES + 16 bytes: within MAX_FRAME_BYTES
    _check(frame)
    wire: dict[str, Any] = {"t": int(frame.type), "s": frame.stream}
    match frame:
        case RequestHead():
            wire.update(m=frame.method, p=frame.path, h=dict(frame.headers))
        case ResponseHead():
            wire.update(c=frame.status, h=dict(frame.headers))
        case BodyChunk() | ResponseChunk():
            wire["d"] = frame.data
        case StreamError():
            wire.update(e=frame.code, x=frame.message)
        case Ping() | Pong():
            wire["n"] = frame.nonce
        case End() | Cancel():
            pass
    data = _packb(wire)
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError(f"frame is {len(data)} bytes, more than {MAX_FRAME_BYTES}")
    return data


# --------------------------------------------------------------------------
# Parse


def parse_frame(data: bytes) -> Frame:
    """One frame from the channel; ValueError for anything oversize, malformed or out of range."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError("frames are binary messages")
    if len(data) > MAX_FRAME_BYTES:
        raise ValueError(f"frame is {len(data)} bytes, more than {MAX_FRAME_BYTES}")
    try:
        wire = msgpack.unpackb(
            data if type(data) is bytes else bytes(data), raw=False, strict_map_key=True, use_list=False,
            max_str_len=MAX_FRAME_BYTES, max_bin_len=MAX_FRAME_BYTES,
            max_array_len=0, max_map_len=LINK_MAX_HEADERS + 8, max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types; all mean "malformed"
        raise ValueError(f"frame is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(wire, dict):
        raise ValueError("a frame must be a msgpack map")
    fast = _parse_chunk_or_end(wire)
    if fast is not None:
        return fast
    tag = _int(wire, "t", 1, _MAX_TAG)
    stream = _int(wire, "s", 0, LINK_MAX_STREAM_ID)
    frame = _build(FrameType(tag), stream, wire)
    _check(frame)
    return frame


def _parse_chunk_or_end(wire: dict[str, Any]) -> Frame | None:
    """The frames of a stream's body (one per token) with the same checks as the general path,
    inline; ``None`` sends anything else (or anything wrong) down the general path."""
    tag, stream = wire.get("t"), wire.get("s")
    if type(stream) is not int or not 1 <= stream <= LINK_MAX_STREAM_ID:
        return None
    if tag == 4 or tag == 2:
        data = wire.get("d")
        if type(data) is bytes and 0 < len(data) <= MAX_CHUNK_BYTES and type(tag) is int:
            return ResponseChunk(stream, data) if tag == 4 else BodyChunk(stream, data)
    elif tag == 5 and type(tag) is int:
        return End(stream)
    return None


def _build(tag: FrameType, stream: int, wire: Mapping[str, Any]) -> Frame:
    if tag is FrameType.REQUEST_HEAD:
        return RequestHead(stream, _str(wire, "m", 16), _str(wire, "p", LINK_MAX_PATH_CHARS), _headers(wire))
    if tag is FrameType.BODY_CHUNK:
        return BodyChunk(stream, _bytes(wire, "d"))
    if tag is FrameType.RESPONSE_HEAD:
        return ResponseHead(stream, _int(wire, "c", 100, 599), _headers(wire))
    if tag is FrameType.RESPONSE_CHUNK:
        return ResponseChunk(stream, _bytes(wire, "d"))
    if tag is FrameType.END:
        return End(stream)
    if tag is FrameType.ERROR:
        return StreamError(stream, _str(wire, "e", 64), _str(wire, "x", LINK_MAX_ERROR_MESSAGE_CHARS))
    if tag is FrameType.CANCEL:
        return Cancel(stream)
    if tag is FrameType.PING:
        return Ping(_int(wire, "n", 0, 2**63 - 1), stream)
    return Pong(_int(wire, "n", 0, 2**63 - 1), stream)


def _check(frame: Frame) -> None:
    """Field rules shared by both directions (so we never send what we would refuse)."""
    control = isinstance(frame, Ping | Pong)
    if isinstance(frame.stream, bool) or not isinstance(frame.stream, int):
        raise ValueError("stream id must be an integer")
    if control and frame.stream != 0:
        raise ValueError("ping and pong travel on stream 0")
    if not control and not 1 <= frame.stream <= LINK_MAX_STREAM_ID:
        raise ValueError(f"stream id must be between 1 and {LINK_MAX_STREAM_ID}")
    match frame:
        case RequestHead():
            if frame.method not in _METHODS:
                raise ValueError("unsupported method")
            if len(frame.path) > LINK_MAX_PATH_CHARS or not _PATH_RE.match(frame.path):
                raise ValueError("path must start with '/' and be printable ASCII")
            _check_headers(frame.headers)
        case ResponseHead():
            if isinstance(frame.status, bool) or not 100 <= frame.status <= 599:
                raise ValueError("status must be 100-599")
            _check_headers(frame.headers)
        case BodyChunk() | ResponseChunk():
            if not isinstance(frame.data, bytes) or not 0 < len(frame.data) <= MAX_CHUNK_BYTES:
                raise ValueError(f"a chunk carries 1 to {MAX_CHUNK_BYTES} bytes")
        case StreamError():
            if not _CODE_RE.match(frame.code):
                raise ValueError("error code must be 1-64 of [a-z0-9_]")
            if len(frame.message) > LINK_MAX_ERROR_MESSAGE_CHARS:
                raise ValueError("error message is too long")
        case Ping() | Pong():
            if isinstance(frame.nonce, bool) or not 0 <= frame.nonce < 2**63:
                raise ValueError("nonce must be a 63-bit unsigned integer")
        case End() | Cancel():
            pass


def _check_headers(headers: Headers) -> None:
    if len(headers) > LINK_MAX_HEADERS:
        raise ValueError(f"more than {LINK_MAX_HEADERS} headers")
    names = set()
    size = 0
    for name, value in headers:
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            raise ValueError("header names must be HTTP tokens")
        if not isinstance(value, str) or _BAD_VALUE_RE.search(value):
            raise ValueError("header values must be strings without CR, LF or NUL")
        if name.lower() in names:
            raise ValueError(f"header {name!r} appears twice")
        names.add(name.lower())
        size += len(name) + len(value)
    if size > LINK_MAX_HEADER_BYTES:
        raise ValueError(f"headers are larger than {LINK_MAX_HEADER_BYTES} characters")


def _int(wire: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = wire.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"'{key}' must be an integer between {low} and {high}")
    return value


def _str(wire: Mapping[str, Any], key: str, limit: int) -> str:
    value = wire.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"'{key}' must be a string of at most {limit} characters")
    return value


def _bytes(wire: Mapping[str, Any], key: str) -> bytes:
    value = wire.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"'{key}' must be binary")
    return value


def _headers(wire: Mapping[str, Any]) -> Headers:
    value = wire.get("h", {})
    if not isinstance(value, dict):
        raise ValueError("'h' must be a map of strings")
    items = tuple(value.items())
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items):
        raise ValueError("'h' must be a map of strings")
    return items
