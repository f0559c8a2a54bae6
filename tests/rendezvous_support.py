"""Helpers for the rendezvous tests: a real server on a free loopback port, and a tampering store."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from rendezvous.config import RendezvousConfig
from rendezvous.server import RendezvousServer
from rendezvous.sessions import PairingSession
from rendezvous.store import SQLiteStore


def make_config(tmp_path: Path, **overrides: Any) -> RendezvousConfig:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "db": str(tmp_path / "rendezvous.sqlite3")}
    values.update(overrides)
    return RendezvousConfig(**values)


@asynccontextmanager
async def running(config: RendezvousConfig, **app_kwargs: Any) -> AsyncIterator[RendezvousServer]:
    server = RendezvousServer(config, **app_kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class TamperingStore(SQLiteStore):
    """A malicious rendezvous: rewrites what it stores (and so what it relays) with ``tamper``."""

    def __init__(self, path: str, tamper: Callable[[PairingSession], PairingSession]) -> None:
        super().__init__(path)
        self._tamper = tamper

    @classmethod
    async def open_with(cls, path: str, tamper: Callable[[PairingSession], PairingSession]) -> TamperingStore:
        store = cls(path, tamper)
        await store._start()
        return store

    async def save_session(self, session: PairingSession) -> None:
        await super().save_session(self._tamper(session))


def replace_last_event_data(session: PairingSession, **changes: str) -> PairingSession:
    last = session.events[-1]
    event = dataclasses.replace(last, data={**last.data, **changes})
    return dataclasses.replace(session, events=(*session.events[:-1], event))


async def request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    token: str | None = None,
    **kwargs: Any,
) -> tuple[int, dict[str, Any], Any]:
    """(status, headers, JSON body) of one raw request."""
    headers = dict(kwargs.pop("headers", {}))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http.request(method, url, headers=headers, **kwargs) as response:
        body = await response.json(content_type=None)
        return response.status, dict(response.headers), body
