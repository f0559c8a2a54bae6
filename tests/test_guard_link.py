"""The guard on the internal Unix-socket site that link requests are replayed through."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from node.config import NodeConfig
from node.constants import LINK_PEER_HEADER
from node.pairing.store import Pairing, PairingStore
from node.security.signing import sign_request_headers

from .conftest import free_port
from .test_guard import APP, CHAT, KEY, NOW, PEER, build_app

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def sites(tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, aiohttp.ClientSession, str]]:
    """A loopback-bound node's guard (unsigned non-loopback callers would be allowed over TCP)
    served on TCP and on a Unix socket: (unix client, tcp client, tcp base URL)."""
    store = PairingStore(tmp_path / "pairings.json")
    await store.add(Pairing(peer_device_id=PEER, peer_device_name="Peer", our_app_id=APP, peer_app_id=APP, key=KEY,
                            via="rendezvous", paired_at=NOW, role="mutual"))
    runner = web.AppRunner(build_app(NodeConfig(), store))
    await runner.setup()
    socket_dir = tempfile.mkdtemp(prefix="dvai-guard-")
    socket_path = str(Path(socket_dir) / "link.sock")
    port = free_port()
    await web.UnixSite(runner, socket_path).start()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    unix = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path))
    tcp = aiohttp.ClientSession()
    try:
        yield unix, tcp, f"http://127.0.0.1:{port}"
    finally:
        await unix.close()
        await tcp.close()
        await runner.cleanup()


async def _call(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    async with session.post(url, data=CHAT, headers=headers) as response:
        return response.status, await response.json()


def _signed(device: str = PEER) -> dict[str, str]:
    return sign_request_headers(KEY, device, APP, "POST", "/v1/chat/completions", CHAT, now_ms=NOW)


async def test_link_site_requires_the_linked_devices_signature(sites) -> None:  # type: ignore[no-untyped-def]
    unix, tcp, base = sites
    url = "http://localhost/v1/chat/completions"
    status, body = await _call(unix, url, {LINK_PEER_HEADER: PEER})
    assert status == 401 and body["error"]["code"] == "signature_required"  # type: ignore[index]
    # a peer claiming loopback gets nothing from it (the test app reads the address from a header)
    status, _ = await _call(unix, url, {LINK_PEER_HEADER: PEER, "X-Test-Remote-Addr": "127.0.0.1"})
    assert status == 401
    status, body = await _call(unix, url, {**_signed(), LINK_PEER_HEADER: PEER})
    assert status == 200 and body["peer"] == PEER and body["auditPeer"] == PEER
    status, _ = await _call(unix, url, {**_signed(), LINK_PEER_HEADER: "dv-someone-else"})
    assert status == 401  # signed, but not by the device at the other end of the link
    # on TCP the header means nothing: a loopback caller stays a loopback caller
    status, body = await _call(tcp, base + "/v1/chat/completions", {LINK_PEER_HEADER: PEER})
    assert status == 200 and body["auditPeer"] == "self"
