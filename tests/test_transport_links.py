"""WebRTC links between two in-process link managers, signaled through a real rendezvous
server on loopback: set-up, streaming, presence, and refusal of unpaired or forged signals."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from node.identity import DeviceIdentity
from node.transport.link import LinkRequest
from node.transport.links import LinkManager, LinkUnavailableError
from node.transport.mux import InboundRequest, ResponseWriter
from node.transport.presence import PresenceConnection
from node.transport.webrtc import LinkState

from .rendezvous_support import make_config, running

pytestmark = pytest.mark.timeout(60)



async def echo(peer_id: str, request: InboundRequest, writer: ResponseWriter) -> None:
    body = await request.body.read()
    writer.head(200, {"X-From": peer_id, "X-Sha": hashlib.sha256(body).hexdigest()})
    for start in range(0, len(body), 4096):
        await writer.write(body[start:start + 4096])
    await writer.end()


@dataclass
class Device:
    identity: DeviceIdentity
    links: LinkManager
    presence: PresenceConnection
    online: list[frozenset[str]]


@pytest.fixture
async def rendezvous_url(tmp_path: Path) -> AsyncIterator[str]:
    async with running(make_config(tmp_path)) as server:
        yield server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def device(url: str, http: aiohttp.ClientSession, keys: dict[str, bytes],
                 identity: DeviceIdentity | None = None, connect_timeout: float = 15.0) -> Device:
    identity = identity or DeviceIdentity.generate()
    links = LinkManager(device_id=identity.device_id, pairing_key_for=keys.get, on_request=echo,
                        connect_timeout=connect_timeout)
    online: list[frozenset[str]] = []
    presence = PresenceConnection(base_url=url, identity=identity, session=http, links=links,
                                  watched=lambda: sorted(keys), on_presence=online.append, interval=0.2)
    await links.start()
    await presence.start()
    await asyncio.wait_for(presence.connected.wait(), 10)
    return Device(identity, links, presence, online)


async def close(*devices: Device) -> None:
    for d in devices:
        await d.presence.stop()
        await d.links.stop()


async def read_all(response) -> bytes:  # type: ignore[no-untyped-def]
    parts = []
    while chunk := await response.read_chunk():
        parts.append(chunk)
    response.release()
    return b"".join(parts)


async def test_link_carries_requests_both_ways(rendezvous_url: str, http: aiohttp.ClientSession) -> None:
    key = os.urandom(32)
    a_id, b_id = DeviceIdentity.generate(), DeviceIdentity.generate()
    a = await device(rendezvous_url, http, {b_id.device_id: key}, a_id)
    b = await device(rendezvous_url, http, {a_id.device_id: key}, b_id)
    try:
        body = os.urandom(300_000)
        response = await a.links.link_for(b_id.device_id).open(LinkRequest("POST", "/v1/x", {}, body),
                                                               connect_timeout=3)
        assert response.status == 200 and response.headers["X-From"] == a_id.device_id
        assert await read_all(response) == body
        info = a.links.info(b_id.device_id)
        assert info is not None and info.state is LinkState.DIRECT
        # the other direction reuses the same link (one channel per pair)
        back = await b.links.link_for(a_id.device_id).open(LinkRequest("GET", "/v1/y"), connect_timeout=3)
        assert back.headers["X-From"] == b_id.device_id and await read_all(back) == b""
        assert b.links.info(a_id.device_id).state is LinkState.DIRECT  # type: ignore[union-attr]
        await asyncio.sleep(1.2)  # a few keeper ticks: idle ping measures the round trip
        assert a.online and b_id.device_id in a.online[-1]
    finally:
        await close(a, b)


async def test_simultaneous_offers_settle_on_one_link(rendezvous_url: str, http: aiohttp.ClientSession) -> None:
    key = os.urandom(32)
    a_id, b_id = DeviceIdentity.generate(), DeviceIdentity.generate()
    a = await device(rendezvous_url, http, {b_id.device_id: key}, a_id)
    b = await device(rendezvous_url, http, {a_id.device_id: key}, b_id)
    try:
        first, second = await asyncio.gather(
            a.links.link_for(b_id.device_id).open(LinkRequest("POST", "/a", {}, b"1"), connect_timeout=10),
            b.links.link_for(a_id.device_id).open(LinkRequest("POST", "/b", {}, b"2"), connect_timeout=10),
        )
        assert await read_all(first) == b"1" and await read_all(second) == b"2"
    finally:
        await close(a, b)


async def test_unpaired_device_gets_no_link_and_no_reply(rendezvous_url: str, http: aiohttp.ClientSession) -> None:
    b_id = DeviceIdentity.generate()
    b = await device(rendezvous_url, http, {})  # B is paired with nobody
    b_id = b.identity
    stranger = await device(rendezvous_url, http, {b_id.device_id: os.urandom(32)}, connect_timeout=3)
    try:
        with pytest.raises(LinkUnavailableError):
            await stranger.links.link_for(b_id.device_id).open(LinkRequest("GET", "/"), connect_timeout=3)
        assert b.links.info(stranger.identity.device_id) is None  # nothing was even created
    finally:
        await close(b, stranger)


async def test_wrong_key_is_dropped(rendezvous_url: str, http: aiohttp.ClientSession) -> None:
    a_id, b_id = DeviceIdentity.generate(), DeviceIdentity.generate()
    a = await device(rendezvous_url, http, {b_id.device_id: os.urandom(32)}, a_id, connect_timeout=3)
    b = await device(rendezvous_url, http, {a_id.device_id: os.urandom(32)}, b_id)
    try:
        with pytest.raises(LinkUnavailableError):
            await a.links.link_for(b_id.device_id).open(LinkRequest("GET", "/"), connect_timeout=3)
        assert b.links.info(a_id.device_id) is None
    finally:
        await close(a, b)


async def test_offline_peer_fails_fast(rendezvous_url: str, http: aiohttp.ClientSession) -> None:
    absent = DeviceIdentity.generate()
    a = await device(rendezvous_url, http, {absent.device_id: os.urandom(32)})
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(LinkUnavailableError, match="not connected"):
            await a.links.link_for(absent.device_id).open(LinkRequest("GET", "/"), connect_timeout=10)
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        await close(a)


async def test_presence_reconnects_after_the_rendezvous_restarts(tmp_path: Path,
                                                                  http: aiohttp.ClientSession) -> None:
    from .conftest import free_port

    config = make_config(tmp_path, port=free_port())
    identity = DeviceIdentity.generate()
    async with running(config) as server:
        d = await device(server.url, http, {}, identity)
    try:
        # the server is gone: the node notices and keeps trying with back-off
        for _ in range(50):
            if not d.presence.connected.is_set():
                break
            await asyncio.sleep(0.1)
        assert not d.presence.connected.is_set() and not d.links.signaling_up
        async with running(config):
            await asyncio.wait_for(d.presence.connected.wait(), 10)
            assert d.links.signaling_up
    finally:
        await close(d)


async def test_a_failed_link_is_set_up_again_on_the_next_request(rendezvous_url: str,
                                                                 http: aiohttp.ClientSession) -> None:
    key = os.urandom(32)
    a_id, b_id = DeviceIdentity.generate(), DeviceIdentity.generate()
    a = await device(rendezvous_url, http, {b_id.device_id: key}, a_id)
    b = await device(rendezvous_url, http, {a_id.device_id: key}, b_id)
    try:
        first = await a.links.link_for(b_id.device_id).open(LinkRequest("POST", "/1", {}, b"one"), connect_timeout=10)
        assert await read_all(first) == b"one"
        b.links._links[a_id.device_id].fail("test: the path broke")  # noqa: SLF001
        for _ in range(100):  # a learns it from the closed association
            info = a.links.info(b_id.device_id)
            if info is not None and not info.state.up:
                break
            await asyncio.sleep(0.05)
        assert not a.links.info(b_id.device_id).state.up  # type: ignore[union-attr]
        again = await a.links.link_for(b_id.device_id).open(LinkRequest("POST", "/2", {}, b"two"), connect_timeout=10)
        assert await read_all(again) == b"two"
        assert a.links.info(b_id.device_id).state is LinkState.DIRECT  # type: ignore[union-attr]
    finally:
        await close(a, b)
