"""Presence and relay over the rendezvous WebSocket, with real clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from node.common.b64 import b64url_encode as _b64
from node.common.messages import presence_auth_message
from node.identity import DeviceIdentity
from node.transport.signaling import (
    SignalingClient,
    SignalingError,
    same_origin,
    websocket_url,
)
from rendezvous.app import STORE_KEY

from .rendezvous_support import make_config, running

pytestmark = pytest.mark.timeout(30)


async def test_two_devices_relay_messages_and_see_each_other(tmp_path: Path) -> None:
    alice, bob = DeviceIdentity.generate(), DeviceIdentity.generate()
    async with running(make_config(tmp_path)) as server:
        async with SignalingClient(server.url, alice) as a, SignalingClient(server.url, bob) as b:
            assert await a.presence([bob.device_id, DeviceIdentity.generate().device_id]) == {bob.device_id}
            await a.send(bob.device_id, "opaque-offer", message_id="m1")
            frame = await asyncio.wait_for(b.receive(), 5)
            assert frame == {"type": "message", "from": alice.device_id, "data": "opaque-offer", "id": "m1"}
            await b.send(alice.device_id, "opaque-answer")
            assert (await asyncio.wait_for(a.receive(), 5))["data"] == "opaque-answer"
            stranger = DeviceIdentity.generate().device_id
            await a.send(stranger, "hello?", message_id="m2")
            error = await asyncio.wait_for(a.receive(), 5)
            assert error["type"] == "error" and error["code"] == "peer_offline" and error["id"] == "m2"
        store = server.app[STORE_KEY]
        assert await store.count_devices() == 2
        assert (await store.get_device(alice.device_id)) is not None


async def test_registered_devices_survive_a_restart(tmp_path: Path) -> None:
    device = DeviceIdentity.generate()
    async with running(make_config(tmp_path)) as server:
        async with SignalingClient(server.url, device):
            pass
    async with running(make_config(tmp_path)) as server:
        record = await server.app[STORE_KEY].get_device(device.device_id)
        assert record is not None and record.public_key == _b64(device.public_key)


async def test_a_forged_challenge_answer_is_refused(tmp_path: Path) -> None:
    victim, attacker = DeviceIdentity.generate(), DeviceIdentity.generate()
    async with running(make_config(tmp_path)) as server, aiohttp.ClientSession() as http:
        variants = [
            # the victim's id with the attacker's key and signature
            lambda nonce, audience: {
                "device_id": victim.device_id, "public_key": _b64(attacker.public_key),
                "signature": _b64(attacker.sign(presence_auth_message(audience, nonce))),
            },
            # the victim's key but a signature by the attacker
            lambda nonce, audience: {
                "device_id": victim.device_id, "public_key": _b64(victim.public_key),
                "signature": _b64(attacker.sign(presence_auth_message(audience, nonce))),
            },
            # a real signature over another nonce (a replay)
            lambda nonce, audience: {
                "device_id": victim.device_id, "public_key": _b64(victim.public_key),
                "signature": _b64(victim.sign(presence_auth_message(audience, "old-nonce"))),
            },
            # a real signature for another rendezvous (audience)
            lambda nonce, audience: {
                "device_id": victim.device_id, "public_key": _b64(victim.public_key),
                "signature": _b64(victim.sign(presence_auth_message("https://evil.example", nonce))),
            },
            lambda nonce, audience: {"device_id": 5, "public_key": None, "signature": []},
        ]
        for make in variants:
            async with http.ws_connect(websocket_url(server.url)) as ws:
                challenge = await ws.receive_json(timeout=5)
                await ws.send_json({"type": "hello", **make(challenge["nonce"], challenge["audience"])})
                error = await ws.receive_json(timeout=5)
                assert error["type"] == "error" and error["code"] == "auth_failed"
                closing = await ws.receive(timeout=5)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == 4401
        assert await server.app[STORE_KEY].count_devices() == 0


async def test_a_client_refuses_a_challenge_for_another_audience(tmp_path: Path) -> None:
    config = make_config(tmp_path, public_url="https://some-other-rendezvous.example")
    async with running(config) as server:
        client = SignalingClient(server.url, DeviceIdentity.generate())
        with pytest.raises(SignalingError, match="challenge is for"):
            await client.connect()
        await client.close()


async def test_silence_after_the_challenge_is_closed(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, ws_auth_timeout=0.2)) as server, aiohttp.ClientSession() as http:
        async with http.ws_connect(websocket_url(server.url)) as ws:
            await ws.receive_json(timeout=5)
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 4408


async def test_oversize_messages_close_the_connection(tmp_path: Path) -> None:
    alice, bob = DeviceIdentity.generate(), DeviceIdentity.generate()
    async with running(make_config(tmp_path, ws_max_message_bytes=2048)) as server:
        async with SignalingClient(server.url, alice) as a, SignalingClient(server.url, bob) as b:
            await a.send(bob.device_id, "x" * 1500)
            assert len((await asyncio.wait_for(b.receive(), 5))["data"]) == 1500
            await a.send(bob.device_id, "x" * 5000)
            with pytest.raises(SignalingError):
                await asyncio.wait_for(a.receive(), 5)
            assert a.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            assert await b.presence([alice.device_id]) == set(), "the offender is gone, the peer is not"


async def test_over_rate_messages_are_refused(tmp_path: Path) -> None:
    alice, bob = DeviceIdentity.generate(), DeviceIdentity.generate()
    config = make_config(tmp_path, ws_messages_per_second=1, ws_burst=3)
    async with running(config) as server:
        async with SignalingClient(server.url, alice) as a, SignalingClient(server.url, bob) as b:
            for i in range(6):
                await a.send(bob.device_id, f"m{i}", message_id=str(i))
            delivered = [await asyncio.wait_for(b.receive(), 5) for _ in range(3)]
            assert [f["data"] for f in delivered] == ["m0", "m1", "m2"]
            refusals = [await asyncio.wait_for(a.receive(), 5) for _ in range(3)]
            assert {f["code"] for f in refusals} == {"rate_limited"}
            assert all(f["retry_after"] > 0 for f in refusals)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(b.receive(), 0.3)


async def test_malformed_frames_get_errors_not_crashes(tmp_path: Path) -> None:
    alice = DeviceIdentity.generate()
    async with running(make_config(tmp_path)) as server:
        async with SignalingClient(server.url, alice) as a:
            ws = a._require_ws()
            for bad in ("not json", "[]", '{"type": 5}', '{"type": "send", "to": "x", "data": "d"}',
                        '{"type": "send", "to": "' + alice.device_id + '", "data": 5}',
                        '{"type": "presence", "device_ids": "all"}', '{"type": "launch"}'):
                await ws.send_str(bad)
                frame = await asyncio.wait_for(a.receive(), 5)
                assert frame["type"] == "error", (bad, frame)
            await ws.send_bytes(b"\x00")
            assert (await asyncio.wait_for(a.receive(), 5))["code"] == "text_only"
            await ws.send_str('{"type": "ping"}')
            assert (await asyncio.wait_for(a.receive(), 5)) == {"type": "pong"}


async def test_a_newer_connection_replaces_the_older(tmp_path: Path) -> None:
    device = DeviceIdentity.generate()
    async with running(make_config(tmp_path)) as server:
        async with SignalingClient(server.url, device) as first, SignalingClient(server.url, device) as second:
            with pytest.raises(SignalingError):
                await asyncio.wait_for(first.receive(), 5)
            assert first.close_code == 4409
            assert await second.presence([device.device_id]) == {device.device_id}


def test_url_helpers() -> None:
    assert websocket_url("https://rv.example/base/") == "wss://rv.example/base/v1/ws"
    assert websocket_url("http://127.0.0.1:5") == "ws://127.0.0.1:5/v1/ws"
    assert same_origin("https://RV.example:443", "wss://rv.example/")
    assert not same_origin("https://rv.example", "http://rv.example")
    with pytest.raises(ValueError):
        websocket_url("ftp://x")
