"""The node's one presence connection to its rendezvous, kept up with back-off.

While connected it relays signaling for the ``LinkManager`` and asks, every
``offload.presence_interval`` seconds, which rendezvous-paired peers are online; the
answer goes to ``on_presence`` (the peer table, in ``node.runtime``). When the
connection drops, ``on_presence`` hears that nobody is reachable and it reconnects
after 1, 2, 4 … up to ``PRESENCE_BACKOFF_MAX_S`` seconds (with jitter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from ..config import IceServer
from ..constants import MAX_PRESENCE_QUERY, PRESENCE_BACKOFF_MAX_S
from ..identity import DeviceIdentity
from .links import LinkManager
from .signaling import SignalingClient, SignalingError

__all__ = ["PresenceConnection"]

log = logging.getLogger(__name__)

PRESENCE_BACKOFF_FIRST_S = 1.0
PRESENCE_STABLE_S = 30.0
"""a connection that lasted this long resets the back-off."""

OnPresence = Callable[[frozenset[str]], None]


class _LockedSender:
    def __init__(self, client: SignalingClient) -> None:
        self._client = client
        self._lock = asyncio.Lock()

    async def send(self, to: str, data: str, *, message_id: str | None = None) -> None:
        async with self._lock:
            await self._client.send(to, data, message_id=message_id)

    async def query(self, device_ids: list[str]) -> None:
        async with self._lock:
            await self._client.query_presence(device_ids)

    async def request_turn(self) -> None:
        async with self._lock:
            await self._client.request_turn()


class PresenceConnection:
    def __init__(
        self,
        *,
        base_url: str,
        identity: DeviceIdentity,
        session: aiohttp.ClientSession,
        links: LinkManager,
        watched: Callable[[], list[str]],
        on_presence: OnPresence,
        interval: float = 10.0,
        want_turn: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url = base_url
        self._identity = identity
        self._session = session
        self._links = links
        self._watched = watched
        self._on_presence = on_presence
        self._interval = interval
        self._want_turn = want_turn
        self._turn: tuple[IceServer, float] | None = None
        """the minted TURN server and when (monotonic) to renew it."""
        self._monotonic = monotonic
        self._task: asyncio.Task[None] | None = None
        self._sender: _LockedSender | None = None
        self._online: frozenset[str] = frozenset()
        self.connected = asyncio.Event()
        self.last_error: str | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="rendezvous-presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def online(self) -> frozenset[str]:
        return self._online

    def turn_servers(self) -> tuple[IceServer, ...]:
        """The TURN server the rendezvous minted credentials for (empty when none or expired)."""
        if self._turn is None:
            return ()
        return (self._turn[0],)

    async def refresh(self) -> None:
        """Ask about the watched peers now (e.g. right after a new pairing); renew TURN credentials."""
        sender = self._sender
        if sender is None:
            return
        if self._want_turn and (self._turn is None or self._monotonic() >= self._turn[1]):
            await sender.request_turn()
        ids = self._watched()[:MAX_PRESENCE_QUERY]
        if ids:
            await sender.query(ids)

    async def _run(self) -> None:
        delay = PRESENCE_BACKOFF_FIRST_S
        while True:
            started = self._monotonic()
            client = SignalingClient(self._base_url, self._identity, session=self._session)
            try:
                await client.connect()
                self.last_error = None
                log.info("connected to the rendezvous %s", self._base_url)
                await self._serve(client)
            except asyncio.CancelledError:
                raise
            except (SignalingError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                if self.last_error != str(exc):
                    log.warning("rendezvous presence connection: %s", exc)
                self.last_error = str(exc) or type(exc).__name__
            finally:
                self._down()
                with contextlib.suppress(Exception):
                    await client.close()
            if self._monotonic() - started > PRESENCE_STABLE_S:
                delay = PRESENCE_BACKOFF_FIRST_S
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, PRESENCE_BACKOFF_MAX_S)

    async def _serve(self, client: SignalingClient) -> None:
        sender = _LockedSender(client)
        self._sender = sender
        self._links.attach_signaling(sender)
        self.connected.set()
        poller = asyncio.create_task(self._poll(), name="rendezvous-presence-poll")
        try:
            while True:
                frame = await client.receive()
                await self._handle(frame)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            sender, data = frame.get("from"), frame.get("data")
            if isinstance(sender, str) and isinstance(data, str):
                await self._links.on_signal(sender, data)
        elif kind == "presence":
            online = frame.get("online")
            if isinstance(online, list):
                watched = set(self._watched())
                self._set_online(frozenset(i for i in online if isinstance(i, str) and i in watched))
        elif kind == "turn":
            self._accept_turn(frame)
        elif kind == "error":
            message_id = frame.get("id")
            if frame.get("code") == "peer_offline" and isinstance(message_id, str):
                self._links.on_undeliverable(message_id)
            else:
                log.debug("rendezvous error: %s", frame.get("message"))

    def _accept_turn(self, frame: dict[str, Any]) -> None:
        urls, username, credential, ttl = (frame.get("urls"), frame.get("username"), frame.get("credential"),
                                           frame.get("ttl"))
        if not (isinstance(urls, list) and urls and all(isinstance(u, str) and u.startswith(("turn:", "turns:"))
                                                       for u in urls)
                and isinstance(username, str) and isinstance(credential, str)
                and isinstance(ttl, int) and ttl >= 60):
            log.warning("the rendezvous sent malformed TURN credentials; ignoring them")
            return
        server = IceServer(urls=tuple(urls[:4]), username=username, credential=credential)
        self._turn = (server, self._monotonic() + ttl * 0.8)  # renewed well before they expire

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)

    def _set_online(self, online: frozenset[str]) -> None:
        self._online = online
        self._on_presence(online)

    def _down(self) -> None:
        self._sender = None
        self._links.attach_signaling(None)
        self.connected.clear()
        if self._online:
            self._set_online(frozenset())
