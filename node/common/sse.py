"""The server-sent events codec: ``data: <json>\\n\\n`` frames closed by ``data: [DONE]\\n\\n``.

Pure bytes in, bytes out (no aiohttp): the local writer (``node/api/sse.py``) encodes
with it, and the offload relay splits a peer's byte stream into whole events with
``EventSplitter``, so a peer dying half-way through an event never leaves a torn event
in front of the error event the client then gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DONE_EVENT",
    "SSE_HEADERS",
    "EventSplitter",
    "OversizeEventError",
    "PeerEvent",
    "encode_event",
    "parse_event",
]

SEPARATOR = b"\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
"""the closing event of every stream."""
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def encode_event(payload: dict[str, Any]) -> bytes:
    """One event: compact JSON (UTF-8 kept as is) after ``data: ``, ended by a blank line."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + SEPARATOR


class OversizeEventError(ValueError):
    """The sender sent more than the splitter's ``max_event_bytes`` without ending an event."""


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """One whole event as received (``raw`` ends with the blank line) and what it says."""

    raw: bytes
    done: bool = False
    """the closing ``data: [DONE]``."""
    text: str = ""
    """generated text in the event (a chat delta's content or a completion's text)."""
    error: dict[str, Any] | None = None
    """the ``error`` object of an error event."""
    usage: dict[str, Any] | None = None
    """the ``usage`` object, when the event carries one (``stream_options.include_usage``)."""
    payload: dict[str, Any] | None = None
    """the event's JSON object (None: ``[DONE]`` or not a JSON object)."""

    @property
    def has_text(self) -> bool:
        return bool(self.text)


class EventSplitter:
    """Feed it bytes as they arrive; it returns the events completed so far."""

    __slots__ = ("_buffer", "_max_event_bytes")

    def __init__(self, *, max_event_bytes: int) -> None:
        self._buffer = b""
        self._max_event_bytes = max_event_bytes

    @property
    def pending(self) -> int:
        """bytes of an event begun but not finished."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[PeerEvent]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            # Servers may end lines with CRLF (sse-starlette does; the SSE spec allows CR, LF or CRLF):
            # events are relayed with LF. A CR at the very end may be half of a CRLF: keep it for later.
            tail = b"\r" if buffer.endswith(b"\r") else b""
            buffer = buffer[:len(buffer) - len(tail)].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        events = []
        start = 0
        while True:
            end = buffer.find(SEPARATOR, start)
            if end < 0:
                break
            events.append(parse_event(buffer[start:end + len(SEPARATOR)]))
            start = end + len(SEPARATOR)
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max_event_bytes:
            raise OversizeEventError(f"a server-sent event longer than {self._max_event_bytes} bytes")
        return events


def parse_event(raw: bytes) -> PeerEvent:
    """Classify one event; anything unparsable is relayed as is and counts as no text."""
    data = b"".join(line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:"))
    if data == b"[DONE]":
        return PeerEvent(raw, done=True)
    try:
        payload = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return PeerEvent(raw)
    if not isinstance(payload, dict):
        return PeerEvent(raw)
    error = payload.get("error")
    if isinstance(error, dict):
        return PeerEvent(raw, error=error, payload=payload)
    usage = payload.get("usage")
    return PeerEvent(raw, text=_text_of(payload), usage=usage if isinstance(usage, dict) else None,
                     payload=payload)


def _text_of(payload: dict[str, Any]) -> str:
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""
