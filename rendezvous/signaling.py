"""Presence and opaque message relay over WebSocket (``GET /v1/ws``).

A device proves its device id by signing a fresh server challenge with its
long-term Ed25519 key (the id is derived from that key). It can then ask who
is online and send opaque text to another connected device by id. The hub
never looks inside ``data``; size and rate limits bound what a device can
make it do. Frames are in ``docs/rendezvous.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from node.common.b64 import b64url_decode, b64url_encode
from node.common.device_ids import is_valid_device_id, verify_device_signature
from node.common.messages import presence_auth_message
from node.common.tokenbucket import TokenBucket

from .constants import MAX_HELLO_FIELD_CHARS, MAX_MESSAGE_ID, MAX_PRESENCE_QUERY
from .metrics import RendezvousMetrics
from .store import RendezvousStore
from .turn import mint_turn_credentials

log = logging.getLogger(__name__)

SEND_TIMEOUT = 5.0
"""seconds a relay may wait on a slow receiver before the message is dropped."""

CLOSE_AUTH_FAILED = 4401
CLOSE_AUTH_TIMEOUT = 4408
CLOSE_REPLACED = 4409
CLOSE_FULL = 1013


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_message_bytes: int = 64 * 1024
    messages_per_second: float = 20.0
    burst: float = 40.0
    auth_timeout: float = 10.0
    max_connections: int = 10_000
    turn_secret: str | None = None
    turn_urls: tuple[str, ...] = ()
    turn_ttl: float = 3600.0


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_frame(text: str) -> dict[str, Any]:
    """A client frame: a JSON object with a string ``type``."""
    try:
        frame = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("invalid_json", "frames must be JSON objects") from exc
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ProtocolError("invalid_frame", "frames must be JSON objects with a string 'type'")
    return frame


def verify_hello(frame: dict[str, Any], audience: str, nonce: str) -> tuple[str, str]:
    """(device id, base64url public key) when ``frame`` answers the challenge; else ProtocolError."""
    if frame.get("type") != "hello":
        raise ProtocolError("auth_required", "answer the challenge with a 'hello' frame first")
    device_id, public_key, signature = frame.get("device_id"), frame.get("public_key"), frame.get("signature")
    if not is_valid_device_id(device_id) or not isinstance(public_key, str) or not isinstance(signature, str):
        raise ProtocolError("auth_failed", "'hello' needs device_id, public_key and signature")
    assert isinstance(device_id, str)
    key, sig = _unb64(public_key), _unb64(signature)
    if key is None or sig is None or not verify_device_signature(
        device_id, key, sig, presence_auth_message(audience, nonce)
    ):
        raise ProtocolError("auth_failed", "the signature does not prove this device id")
    return device_id, public_key


class _Connection:
    def __init__(self, ws: web.WebSocketResponse, device_id: str, bucket: TokenBucket) -> None:
        self.ws = ws
        self.device_id = device_id
        self.bucket = bucket
        self.send_lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> bool:
        async with self.send_lock:
            try:
                await asyncio.wait_for(self.ws.send_json(frame), SEND_TIMEOUT)
            except (ConnectionError, RuntimeError, TimeoutError):
                return False
        return True


class SignalingHub:
    """Authenticated WebSocket connections by device id, and the relay between them."""

    def __init__(
        self,
        *,
        store: RendezvousStore,
        audience: str,
        limits: RelayLimits,
        metrics: RendezvousMetrics,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._store = store
        self._audience = audience
        self._limits = limits
        self._metrics = metrics
        self._clock = clock
        self._random = random_bytes
        self._connections: dict[str, _Connection] = {}

    @property
    def online_count(self) -> int:
        return len(self._connections)

    async def serve(self, ws: web.WebSocketResponse) -> None:
        """Run one prepared WebSocket until it closes."""
        connection = await self._authenticate(ws)
        if connection is None:
            return
        try:
            await connection.send({"type": "welcome", "device_id": connection.device_id})
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await self._handle(connection, message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._error(connection, "text_only", "send JSON text frames")
        finally:
            if self._connections.get(connection.device_id) is connection:
                del self._connections[connection.device_id]
                self._metrics.ws_connections.set(len(self._connections))

    async def close_all(self) -> None:
        for connection in list(self._connections.values()):
            with suppress(Exception):
                await connection.ws.close(code=1001, message=b"rendezvous shutting down")
        self._connections.clear()
        self._metrics.ws_connections.set(0)

    # ----------------------------------------------------------------------

    async def _authenticate(self, ws: web.WebSocketResponse) -> _Connection | None:
        nonce = b64url_encode(self._random(32))
        await ws.send_json({"type": "challenge", "version": 1, "nonce": nonce, "audience": self._audience})
        try:
            message = await ws.receive(timeout=self._limits.auth_timeout)
        except TimeoutError:
            await ws.close(code=CLOSE_AUTH_TIMEOUT, message=b"no answer to the challenge")
            return None
        if message.type != WSMsgType.TEXT:
            await ws.close(code=CLOSE_AUTH_FAILED, message=b"expected a hello frame")
            return None
        try:
            device_id, public_key = verify_hello(parse_frame(message.data), self._audience, nonce)
        except ProtocolError as exc:
            self._metrics.ws_auth_failures.inc()
            with suppress(ConnectionError, RuntimeError):
                await ws.send_json({"type": "error", "code": exc.code, "message": exc.message})
            await ws.close(code=CLOSE_AUTH_FAILED, message=exc.message.encode()[:120])
            return None
        if device_id not in self._connections and len(self._connections) >= self._limits.max_connections:
            await ws.close(code=CLOSE_FULL, message=b"rendezvous full; try again later")
            return None
        await self._store.register_device(device_id, public_key, self._clock())
        previous = self._connections.get(device_id)
        if previous is not None:
            with suppress(Exception):
                await previous.ws.close(code=CLOSE_REPLACED, message=b"replaced by a newer connection")
        bucket = TokenBucket.full(self._limits.messages_per_second, self._limits.burst, self._clock())
        connection = _Connection(ws, device_id, bucket)
        self._connections[device_id] = connection
        self._metrics.ws_connections.set(len(self._connections))
        return connection

    async def _handle(self, connection: _Connection, text: str) -> None:
        wait = connection.bucket.take(self._clock())
        if wait > 0:
            self._metrics.relay_refused.labels("rate").inc()
            await self._error(connection, "rate_limited", "too many messages", retry_after=round(wait, 3))
            return
        try:
            frame = parse_frame(text)
            kind = frame["type"]
            if kind == "send":
                await self._relay(connection, frame)
            elif kind == "presence":
                await self._presence(connection, frame)
            elif kind == "ping":
                await connection.send({"type": "pong"})
            elif kind == "turn":
                await self._turn(connection)
            else:
                raise ProtocolError("unknown_type", f"unknown frame type {kind[:40]!r}")
        except ProtocolError as exc:
            await self._error(connection, exc.code, exc.message, message_id=_message_id(text))

    async def _relay(self, connection: _Connection, frame: dict[str, Any]) -> None:
        to, data, message_id = frame.get("to"), frame.get("data"), frame.get("id")
        if not is_valid_device_id(to):
            raise ProtocolError("invalid_frame", "'to' must be a device id")
        if not isinstance(data, str):
            raise ProtocolError("invalid_frame", "'data' must be a string")
        if message_id is not None and (not isinstance(message_id, str) or len(message_id) > MAX_MESSAGE_ID):
            raise ProtocolError("invalid_frame", f"'id' must be a string of at most {MAX_MESSAGE_ID} characters")
        assert isinstance(to, str)
        target = self._connections.get(to)
        out: dict[str, Any] = {"type": "message", "from": connection.device_id, "data": data}
        if message_id is not None:
            out["id"] = message_id
        if target is None or not await target.send(out):
            self._metrics.relay_refused.labels("offline").inc()
            await self._error(connection, "peer_offline", "that device is not connected", message_id=message_id)
            return
        self._metrics.relayed.inc()

    async def _turn(self, connection: _Connection) -> None:
        limits = self._limits
        if limits.turn_secret is None:
            raise ProtocolError("turn_unavailable", "this rendezvous has no TURN server configured")
        credentials = mint_turn_credentials(limits.turn_secret, limits.turn_urls, connection.device_id,
                                            self._clock(), limits.turn_ttl)
        self._metrics.turn_minted.inc()
        await connection.send(credentials.to_frame())

    async def _presence(self, connection: _Connection, frame: dict[str, Any]) -> None:
        ids = frame.get("device_ids")
        if not isinstance(ids, list) or len(ids) > MAX_PRESENCE_QUERY or not all(isinstance(i, str) for i in ids):
            raise ProtocolError("invalid_frame", f"'device_ids' must be a list of at most {MAX_PRESENCE_QUERY} ids")
        await connection.send({"type": "presence", "online": [i for i in ids if i in self._connections]})

    async def _error(
        self,
        connection: _Connection,
        code: str,
        message: str,
        *,
        message_id: Any = None,
        retry_after: float | None = None,
    ) -> None:
        frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if isinstance(message_id, str) and len(message_id) <= MAX_MESSAGE_ID:
            frame["id"] = message_id
        if retry_after is not None:
            frame["retry_after"] = retry_after
        await connection.send(frame)


def _message_id(text: str) -> Any:
    with suppress(Exception):
        frame = json.loads(text)
        if isinstance(frame, dict):
            return frame.get("id")
    return None


def _unb64(text: str) -> bytes | None:
    if len(text) > MAX_HELLO_FIELD_CHARS:
        return None
    try:
        return b64url_decode(text)
    except ValueError:
        return None
