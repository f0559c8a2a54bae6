"""TURN credentials minted by the rendezvous in coturn's REST scheme."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from pathlib import Path

import aiohttp
import pytest

from node.common.errors import ConfigError
from node.identity import DeviceIdentity
from node.transport.links import LinkManager
from node.transport.presence import PresenceConnection
from node.transport.signaling import SignalingClient
from rendezvous.config import config_from_mapping
from rendezvous.turn import mint_turn_credentials

from .rendezvous_support import make_config, running

pytestmark = pytest.mark.timeout(30)
SECRET = "a-shared-secret-of-some-length"
URLS = ("turn:turn.example.org:3478?transport=udp",)


def test_credentials_follow_coturns_rest_scheme() -> None:
    minted = mint_turn_credentials(SECRET, URLS, "dvai-abc", now=1000.4, ttl=600)
    assert minted.username == "1600:dvai-abc"  # expiry first, as coturn reads it
    expected = base64.b64encode(hmac.new(SECRET.encode(), b"1600:dvai-abc", hashlib.sha1).digest()).decode()
    assert minted.credential == expected
    assert mint_turn_credentials("another-secret-of-length", URLS, "dvai-abc", 1000.4, 600).credential != expected


def test_config_checks() -> None:
    for bad in ({"turn_secret": "short", "turn_urls": list(URLS)}, {"turn_secret": SECRET},
                {"turn_urls": ["http://x"]}, {"turn_ttl": 5}):
        with pytest.raises(ConfigError):
            config_from_mapping(bad)
    assert config_from_mapping({"turn_secret": SECRET, "turn_urls": list(URLS)}).turn_urls == URLS


async def test_only_an_authenticated_device_gets_credentials(tmp_path: Path) -> None:
    device = DeviceIdentity.generate()
    async with running(make_config(tmp_path, turn_secret=SECRET, turn_urls=URLS, turn_ttl=900)) as server:
        async with SignalingClient(server.url, device) as client:
            await client.request_turn()
            frame = await asyncio.wait_for(client.receive(), 5)
        assert frame["type"] == "turn" and frame["urls"] == list(URLS) and frame["ttl"] == 900
        expiry, _, user = frame["username"].partition(":")
        assert user == device.device_id and int(expiry) > 900
        digest = hmac.new(SECRET.encode(), frame["username"].encode(), hashlib.sha1).digest()
        assert frame["credential"] == base64.b64encode(digest).decode()
        # without the challenge answered, the socket never gets that far
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/v1/ws") as ws:
            await ws.receive_json()  # the challenge
            await ws.send_json({"type": "turn"})
            refusal = await ws.receive_json()
            assert refusal["type"] == "error" and refusal["code"] == "auth_required"


async def test_rendezvous_without_turn_says_so_and_presence_adds_minted_servers(tmp_path: Path) -> None:
    device = DeviceIdentity.generate()
    async with running(make_config(tmp_path)) as server:
        async with SignalingClient(server.url, device) as client:
            await client.request_turn()
            frame = await asyncio.wait_for(client.receive(), 5)
        assert frame["type"] == "error" and frame["code"] == "turn_unavailable"
    async with running(make_config(tmp_path, turn_secret=SECRET, turn_urls=URLS)) as server, \
            aiohttp.ClientSession() as http:
        links = LinkManager(device_id=device.device_id, pairing_key_for=lambda _id: None)
        presence = PresenceConnection(base_url=server.url, identity=device, session=http, links=links,
                                      watched=list, on_presence=lambda _online: None, want_turn=True)
        await presence.start()
        try:
            for _ in range(50):
                if presence.turn_servers():
                    break
                await asyncio.sleep(0.1)
            (turn,) = presence.turn_servers()
            assert turn.urls == URLS and turn.username and turn.username.endswith(device.device_id)
        finally:
            await presence.stop()
