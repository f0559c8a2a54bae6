"""Client of the rendezvous presence WebSocket (``GET /v1/ws``).

A device connects, answers the server's challenge by signing it with its
long-term Ed25519 key (which proves its device id, since the id is derived
from the key), then sends and receives opaque messages addressed by device
id. The rendezvous relays them unread; a later layer encrypts them with the
pairing key. The wire format is in ``docs/rendezvous.md``.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..common.b64 import b64url_encode
from ..common.messages import presence_auth_message
from ..identity import DeviceIdentity

WS_PATH = "/v1/ws"


class SignalingError(Exception):
    """The rendezvous refused us or spoke something we do not understand."""


def websocket_url(base_url: str) -> str:
    """``https://host/prefix`` → ``wss://host/prefix/v1/ws`` (``http`` → ``ws``)."""
    parts = urlsplit(base_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path + WS_PATH, "", ""))


def same_origin(a: str, b: str) -> bool:
    """True when two base URLs name the same server (scheme family, host, port, path)."""

    def norm(url: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(url.rstrip("/"))
        secure = parts.scheme in ("https", "wss")
        port = parts.port or (443 if secure else 80)
        return ("s" if secure else "", (parts.hostname or "").lower(), port, parts.path)

    return norm(a) == norm(b)


class SignalingClient:
    """One authenticated presence connection. Use ``async with`` or ``connect()`` / ``close()``."""

    def __init__(
        self,
        base_url: str,
        identity: DeviceIdentity,
        *,
        session: aiohttp.ClientSession | None = None,
        check_audience: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self._base_url = base_url
        self._identity = identity
        self._session = session
        self._own_session = session is None
        self._check_audience = check_audience
        self._timeout = timeout
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: deque[dict[str, Any]] = deque(maxlen=1024)
        self._close_code: int | None = None

    async def __aenter__(self) -> SignalingClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(websocket_url(self._base_url), heartbeat=30.0)
        challenge = await self._read()
        if challenge.get("type") != "challenge":
            raise SignalingError(f"expected a challenge, got {challenge.get('type')!r}")
        audience, nonce = str(challenge.get("audience", "")), str(challenge.get("nonce", ""))
        if self._check_audience and not same_origin(audience, self._base_url):
            # A server that relays another server's challenge would make us sign in there as us.
            raise SignalingError(f"challenge is for {audience!r}, not {self._base_url!r}")
        signature = self._identity.sign(presence_auth_message(audience, nonce))
        await self._ws.send_json({
            "type": "hello",
            "device_id": self._identity.device_id,
            "public_key": b64url_encode(self._identity.public_key),
            "signature": b64url_encode(signature),
        })
        welcome = await self._read()
        if welcome.get("type") != "welcome":
            raise SignalingError(f"authentication refused: {welcome.get('message', welcome)}")

    async def send(self, to: str, data: str, *, message_id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "send", "to": to, "data": data}
        if message_id is not None:
            frame["id"] = message_id
        await self._require_ws().send_json(frame)

    async def query_presence(self, device_ids: list[str]) -> None:
        """Ask which of ``device_ids`` are online without waiting: the answer arrives through
        ``receive`` as a ``presence`` frame (for a connection whose reader runs elsewhere)."""
        await self._require_ws().send_json({"type": "presence", "device_ids": device_ids})

    async def request_turn(self) -> None:
        """Ask for time-limited TURN credentials; the answer (a ``turn`` frame, or an ``error``
        with code ``turn_unavailable``) arrives through ``receive``."""
        await self._require_ws().send_json({"type": "turn"})

    async def presence(self, device_ids: list[str]) -> set[str]:
        """Which of ``device_ids`` are connected now; other frames read meanwhile are kept for ``receive``."""
        await self._require_ws().send_json({"type": "presence", "device_ids": device_ids})
        while True:
            frame = await self._read()
            if frame.get("type") == "presence":
                return set(frame.get("online", ()))
            self._pending.append(frame)

    async def receive(self) -> dict[str, Any]:
        """The next frame from the server (``message``, ``error``, ``pong``…); wrap in ``asyncio.timeout``."""
        if self._pending:
            return self._pending.popleft()
        return await self._read(limited=False)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def closed(self) -> bool:
        return self._ws is None or self._ws.closed

    @property
    def close_code(self) -> int | None:
        """The code the server closed with (as sent in its close frame, when it sent one)."""
        if self._close_code is not None:
            return self._close_code
        return None if self._ws is None else self._ws.close_code

    def _require_ws(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            raise SignalingError("not connected")
        return self._ws

    async def _read(self, *, limited: bool = True) -> dict[str, Any]:
        ws = self._require_ws()
        message = await ws.receive(timeout=self._timeout if limited else None)
        if message.type == aiohttp.WSMsgType.CLOSE and isinstance(message.data, int):
            self._close_code = message.data
        if message.type != aiohttp.WSMsgType.TEXT:
            raise SignalingError(f"connection closed ({ws.close_code}): {message.extra or message.type.name}")
        try:
            frame = json.loads(message.data)
        except json.JSONDecodeError as exc:
            raise SignalingError("the server sent a frame that is not JSON") from exc
        if not isinstance(frame, dict):
            raise SignalingError("the server sent a frame that is not a JSON object")
        return frame
