"""The internet path end to end on loopback: a real `dvai-rendezvous` process and real node
processes (SIMULATED engine) that reach each other over WebRTC data channels.

Here the test process plays a QR-paired device itself (its own identity, the real QR
pairing through the rendezvous, the link stack of ``node.transport``) to check what the
serving node does with link traffic: every request goes through the same checks as HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from node.identity import DeviceIdentity
from node.security import sign_request_headers
from node.transport.link import LinkRequest
from node.transport.links import LinkManager, LinkUnavailableError
from node.transport.presence import PresenceConnection
from node.transport.rendezvous_client import QrPairingScanner

from .conftest import REPO, NodeProcess, free_port, start_node_process
from .netns_device import hostile_payloads
from .test_qr_e2e import rendezvous  # noqa: F401 - the fixture: a real rendezvous process

pytestmark = pytest.mark.timeout(120)
SIMULATED = '[models.gemma3-270m]\nengine = "simulated"\nsimulated_tok_per_s = 200\n'  # SIMULATED engine
MAX_BODY = 2 * 1024 * 1024
CHAT = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "Count for me"}], "max_tokens": 24,
        "stream": True}


def node_config(rendezvous_url: str) -> str:
    return (f"max_body_bytes = {MAX_BODY}\n" + SIMULATED + "[offload]\nenabled = true\ndiscover_lan = false\nprobe_on_start = false\n"
            f'rendezvous_url = "{rendezvous_url}"\npresence_interval = 0.5\n')



@dataclass
class PairedDevice:
    """The test process as a device QR-paired with the node."""

    identity: DeviceIdentity
    key: bytes
    node_id: str
    links: LinkManager

    def signed(self, path: str, body: bytes, method: str = "POST") -> LinkRequest:
        headers = sign_request_headers(self.key, self.identity.device_id, self.identity.device_id, method, path, body)
        return LinkRequest(method, path, {**headers, "Content-Type": "application/json"}, body)

    async def send(self, request: LinkRequest) -> tuple[int, dict[str, str], bytes]:
        response = await self.links.link_for(self.node_id).open(request, connect_timeout=self.links.connect_timeout)
        parts = []
        while chunk := await response.read_chunk():
            parts.append(chunk)
        response.release()
        return response.status, dict(response.headers), b"".join(parts)


async def _node_id(node: NodeProcess, http: aiohttp.ClientSession) -> str:
    return str((await (await http.get(node.root + "/v1/dvai/health")).json())["deviceId"])


async def _qr_pair(node: NodeProcess, identity: DeviceIdentity, http: aiohttp.ClientSession) -> bytes:
    offer = await (await http.post(node.root + "/v1/dvai/pair-qr")).json()
    result = await QrPairingScanner(identity=identity, device_name="test-device", http=http).pair(offer["payload"])
    for _ in range(100):  # the node stores its side once our finish message arrived
        status = await (await http.get(node.root + f"/v1/dvai/pair-qr/{offer['sessionId']}")).json()
        if status.get("state") == "paired":
            break
        await asyncio.sleep(0.1)
    return result.pairing_key


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def serving(tmp_path: Path, rendezvous: str, http: aiohttp.ClientSession  # noqa: F811
                  ) -> AsyncIterator[tuple[NodeProcess, PairedDevice]]:
    node = start_node_process(tmp_path / "b", config_text=node_config(rendezvous))
    links: LinkManager | None = None
    presence: PresenceConnection | None = None
    try:
        node_id = await _node_id(node, http)
        me = DeviceIdentity.generate()
        key = await _qr_pair(node, me, http)
        links = LinkManager(device_id=me.device_id, pairing_key_for={node_id: key}.get, connect_timeout=15)
        presence = PresenceConnection(base_url=rendezvous, identity=me, session=http, links=links,
                                      watched=lambda: [node_id], on_presence=lambda _o: None, interval=0.3)
        await links.start()
        await presence.start()
        await asyncio.wait_for(presence.connected.wait(), 10)
        for _ in range(100):
            if node_id in presence.online:
                break
            await asyncio.sleep(0.1)
        yield node, PairedDevice(me, key, node_id, links)
    finally:
        if presence is not None:
            await presence.stop()
        if links is not None:
            await links.stop()
        node.stop()


def _content(sse: bytes) -> tuple[str, bool]:
    text, done = [], False
    for line in sse.decode().splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text), done


async def test_link_requests_pass_every_http_check(serving: tuple[NodeProcess, PairedDevice],
                                                   http: aiohttp.ClientSession) -> None:
    node, me = serving
    body = json.dumps(CHAT).encode()

    # a signed streamed chat over the link: served, identical to asking the node directly
    request = me.signed("/v1/chat/completions", body)
    status, headers, sse = await me.send(request)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    over_link, done = _content(sse)
    direct = await (await http.post(node.base_url + "/chat/completions", json=CHAT)).read()
    assert done and over_link and over_link == _content(direct)[0]

    # the same signed request again: the node's nonce cache refuses the replay
    status, _, replayed = await me.send(request)
    assert status == 401 and "nonce" in replayed.decode().lower()

    # unsigned, or signed by another device than the linked one: refused
    status, _, unsigned = await me.send(LinkRequest("POST", "/v1/chat/completions", {}, body))
    assert status == 401 and json.loads(unsigned)["error"]["code"] == "signature_required"
    other = DeviceIdentity.generate()
    foreign = sign_request_headers(me.key, other.device_id, other.device_id, "POST", "/v1/chat/completions", body)
    status, _, _ = await me.send(LinkRequest("POST", "/v1/chat/completions", foreign, body))
    assert status == 401

    # a bad signature: the guard's verification, as over HTTP
    signed = me.signed("/v1/chat/completions", body)
    forged = LinkRequest(signed.method, signed.path, {**signed.headers, "X-DVAI-Signature": "0" * 64}, signed.body)
    status, _, _ = await me.send(forged)
    assert status == 401

    # link traffic never gets loopback trust: admin endpoints stay closed
    status, _, admin = await me.send(me.signed("/v1/dvai/pairings", b"", method="GET"))
    assert status == 403 and json.loads(admin)["error"]["code"] == "loopback_only"

    # bad input over the link gets the same 4xx as over HTTP
    status, _, bad = await me.send(me.signed("/v1/chat/completions", b'{"model": 5}'))
    assert status == 400 and json.loads(bad)["error"]["type"] == "invalid_request_error"

    # the audit log recorded each one: this device's served and invalid requests, the refusals
    # (unproven, so anonymous) as well
    audit = await (await http.get(node.root + "/v1/dvai/audit")).json()
    rows = [(row["peerDeviceId"], row["status"]) for row in audit["data"]]
    assert (me.identity.device_id, 200) in rows and (me.identity.device_id, 400) in rows
    assert rows.count(("anonymous", 401)) == 4


async def test_large_bodies_stream_over_the_link_and_the_cap_answers_413(
        serving: tuple[NodeProcess, PairedDevice], http: aiohttp.ClientSession) -> None:
    node, me = serving
    # 1.5 MiB of body (25 chunk frames), streamed into the node's own HTTP stack as it arrives;
    # the signature covers every byte of it, so a 200 means all of it arrived intact
    large = {**CHAT, "stream": False, "max_tokens": 4, "user": "u" * (MAX_BODY * 3 // 4)}
    status, _, answer = await me.send(me.signed("/v1/chat/completions", json.dumps(large).encode()))
    assert status == 200, answer[:300]
    direct = await http.post(node.base_url + "/chat/completions", json=large)
    assert json.loads(answer)["choices"][0]["message"]["content"] == \
        (await direct.json())["choices"][0]["message"]["content"]
    # over the node's max_body_bytes: the OpenAI-shaped 413 once the cap is crossed, as over HTTP
    huge = json.dumps({**large, "user": "u" * (2 * MAX_BODY)}).encode()
    status, _, refused = await me.send(me.signed("/v1/chat/completions", huge))
    assert status == 413, refused[:300]
    error = json.loads(refused)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "payload_too_large"
    status, _, _ = await me.send(me.signed("/v1/chat/completions", json.dumps(CHAT).encode()))
    assert status == 200  # the link carries on


async def test_cancel_over_the_link_stops_generation(serving: tuple[NodeProcess, PairedDevice],
                                                     http: aiohttp.ClientSession) -> None:
    node, me = serving
    body = json.dumps({**CHAT, "max_tokens": 2000}).encode()  # 10 s at 200 tok/s
    response = await me.links.link_for(me.node_id).open(me.signed("/v1/chat/completions", body),
                                                         connect_timeout=15)
    assert response.status == 200
    assert await response.read_chunk()
    response.cancel()
    for _ in range(50):  # the node's audit row shows the request ended early, as a client disconnect
        rows = (await (await http.get(node.root + "/v1/dvai/audit",
                                      params={"peer": me.identity.device_id})).json())["data"]
        if rows:
            break
        await asyncio.sleep(0.1)
    # the handler saw the client go (499, or a stream cut short), long before 2000 tokens
    assert rows, "the node never finished the cancelled request"
    assert rows[0]["status"] in (200, 499) and rows[0]["latencyMs"] < 5000, rows[0]
    assert (rows[0]["completionTokens"] or 0) < 1000, rows[0]


async def _pair_nodes(a: NodeProcess, b: NodeProcess, http: aiohttp.ClientSession) -> None:
    """QR pairing between two node processes through their admin endpoints (as the CLI does)."""
    offer = await (await http.post(a.root + "/v1/dvai/pair-qr")).json()
    scanned = await http.post(b.root + "/v1/dvai/pair-scan", json={"payload": offer["payload"]})
    assert scanned.status == 200, await scanned.text()
    for _ in range(100):
        status = await (await http.get(a.root + f"/v1/dvai/pair-qr/{offer['sessionId']}")).json()
        if status.get("state") == "paired":
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"pairing did not finish: {status}")


async def _peers(node: NodeProcess, http: aiohttp.ClientSession) -> list[dict[str, object]]:
    return list((await (await http.get(node.root + "/v1/dvai/peers")).json())["data"])


async def _wait_for_peer(node: NodeProcess, http: aiohttp.ClientSession, device_id: str,
                         predicate: object = None, within: float = 30) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + within
    last: list[dict[str, object]] = []
    while asyncio.get_running_loop().time() < deadline:
        last = await _peers(node, http)
        for peer in last:
            if peer["deviceId"] == device_id and (predicate is None or predicate(peer)):  # type: ignore[operator]
                return peer
        await asyncio.sleep(0.2)
    raise AssertionError(f"peer {device_id} never showed up as wanted: {last}")


async def test_qr_paired_nodes_list_each_other_as_rendezvous_peers(
        tmp_path: Path, rendezvous: str, http: aiohttp.ClientSession) -> None:  # noqa: F811
    a = start_node_process(tmp_path / "a", config_text=node_config(rendezvous))
    b = start_node_process(tmp_path / "b", config_text=node_config(rendezvous))
    try:
        await _pair_nodes(a, b, http)
        b_id = await _node_id(b, http)
        peer = await _wait_for_peer(a, http, b_id, lambda p: p["state"] == "reachable")
        assert peer["via"] == "rendezvous" and peer["identityVerified"] is True
        assert peer["loadedModels"] == ["gemma3-270m"]
        link = peer["link"]
        assert isinstance(link, dict) and link["state"] == "direct"
        peer = await _wait_for_peer(a, http, b_id, lambda p: (p["link"] or {}).get("rttMs") is not None)
        assert 0 < peer["link"]["rttMs"] < 1000  # type: ignore[index]
        b.stop()  # gone from the rendezvous → gone from the table
        for _ in range(100):
            if all(p["deviceId"] != b_id for p in await _peers(a, http)):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("a stopped peer stayed listed")
    finally:
        a.stop()
        b.stop()


# -- a malicious rendezvous, hostile frames ----------------------------------------------------


@contextlib.contextmanager
def tampering_rendezvous(tmp_path: Path, mode: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.tampering_rendezvous", "--host", "127.0.0.1", "--port", str(port),
         "--db", str(tmp_path / f"tamper-{mode}.sqlite3")],
        cwd=REPO, env={**os.environ, "DVAI_TAMPER": mode}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@contextlib.asynccontextmanager
async def paired_device(node: NodeProcess, rendezvous_url: str, http: aiohttp.ClientSession,
                        connect_timeout: float = 15) -> AsyncIterator[PairedDevice]:
    node_id = await _node_id(node, http)
    me = DeviceIdentity.generate()
    key = await _qr_pair(node, me, http)
    links = LinkManager(device_id=me.device_id, pairing_key_for={node_id: key}.get,
                        connect_timeout=connect_timeout)
    presence = PresenceConnection(base_url=rendezvous_url, identity=me, session=http, links=links,
                                  watched=lambda: [node_id], on_presence=lambda _o: None, interval=0.3)
    await links.start()
    await presence.start()
    try:
        await asyncio.wait_for(presence.connected.wait(), 10)
        while node_id not in presence.online:
            await asyncio.sleep(0.1)
        yield PairedDevice(me, key, node_id, links)
    finally:
        await presence.stop()
        await links.stop()


async def _served(node: NodeProcess, http: aiohttp.ClientSession) -> int:
    rows = (await (await http.get(node.root + "/v1/dvai/audit")).json())["data"]
    return sum(1 for row in rows if row["peerDeviceId"] not in ("self", "anonymous"))


async def test_a_rendezvous_that_alters_signaling_gets_no_link(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    with tampering_rendezvous(tmp_path, "flip") as url:
        node = start_node_process(tmp_path / "b", config_text=node_config(url))
        try:
            async with paired_device(node, url, http, connect_timeout=4) as me:
                with pytest.raises(LinkUnavailableError):
                    await me.send(me.signed("/v1/chat/completions", json.dumps(CHAT).encode()))
            assert await _served(node, http) == 0
            peers = await _peers(node, http)
            assert all((p.get("link") or {}).get("state") not in ("direct", "relayed") for p in peers)
        finally:
            node.stop()


async def test_a_rendezvous_that_replays_signaling_gets_no_link(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    with tampering_rendezvous(tmp_path, "replay") as url:
        node = start_node_process(tmp_path / "b", config_text=node_config(url))
        try:
            async with paired_device(node, url, http, connect_timeout=4) as me:
                # the node links to us first (to fetch our health): the first set-up is genuine
                await _wait_for_peer(node, http, me.identity.device_id, lambda p: p["state"] != "pending")
                status, _, _ = await me.send(me.signed("/v1/chat/completions", json.dumps(CHAT).encode()))
                assert status == 200
                link = me.links._links[me.node_id]  # noqa: SLF001 - close it to force a second set-up
                link.close("test")
                await link.wait_closed()
                # every later offer is replaced by the first one, which the node refuses as a replay
                with pytest.raises(LinkUnavailableError):
                    await me.send(me.signed("/v1/chat/completions", json.dumps(CHAT).encode()))
            assert await _served(node, http) == 1
        finally:
            node.stop()


async def test_hostile_frames_close_the_link_and_the_node_keeps_serving(
        serving: tuple[NodeProcess, PairedDevice], http: aiohttp.ClientSession) -> None:
    node, me = serving
    body = json.dumps({**CHAT, "stream": False, "max_tokens": 4}).encode()
    for name, frames in hostile_payloads().items():
        status, _, _ = await me.send(me.signed("/v1/chat/completions", body))
        assert status == 200, name  # a (new) link is up
        link = me.links._links[me.node_id]  # noqa: SLF001 - the test writes raw bytes on its channel
        channel = link._mux._channel  # type: ignore[union-attr]  # noqa: SLF001
        with contextlib.suppress(Exception):
            for frame in frames:
                channel.send(frame)
        for _ in range(100):
            if not link.state.up:
                break
            await asyncio.sleep(0.05)
        assert not link.state.up, f"{name}: the node did not close the link"
        direct = await http.post(node.base_url + "/chat/completions", json={**CHAT, "stream": False})
        assert direct.status == 200, name  # the node is up and serving other clients


# -- routing over the link ---------------------------------------------------------------------


def routed_config(rendezvous_url: str, rate: float) -> str:
    """A SIMULATED node at ``rate`` tok/s that knows its own speed (no probe at start)."""
    return node_config(rendezvous_url).replace("simulated_tok_per_s = 200", f"simulated_tok_per_s = {rate:g}")


def _sse_in_order(sse: str) -> tuple[str, list[dict[str, object]], bool]:
    text, errors, done = [], [], False
    for line in sse.splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
            for choice in event.get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text), errors, done


@pytest.fixture
async def linked_nodes(tmp_path: Path, rendezvous: str, http: aiohttp.ClientSession  # noqa: F811
                       ) -> AsyncIterator[tuple[NodeProcess, NodeProcess, str]]:
    """A slow node A (SIMULATED 2 tok/s) QR-paired with a fast node B (SIMULATED 200 tok/s)."""
    a = start_node_process(tmp_path / "a", config_text=routed_config(rendezvous, 2))
    b = start_node_process(tmp_path / "b", config_text=routed_config(rendezvous, 200))
    try:
        await _pair_nodes(a, b, http)
        b_id = await _node_id(b, http)
        await _wait_for_peer(a, http, b_id, lambda p: p["state"] == "reachable")
        yield a, b, b_id
    finally:
        a.stop()
        b.stop()


async def test_require_is_served_by_the_rendezvous_peer_over_the_link(
        linked_nodes: tuple[NodeProcess, NodeProcess, str], http: aiohttp.ClientSession) -> None:
    a, b, b_id = linked_nodes
    request = {**CHAT, "max_tokens": 40}
    async with http.post(a.base_url + "/chat/completions", json=request,
                         headers={"X-DVAI-Offload": "require"}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["X-DVAI-Served-By"] == b_id
        relayed = await response.text()
    direct = await (await http.post(b.base_url + "/chat/completions", json=request)).text()
    text, errors, done = _sse_in_order(relayed)
    assert done and not errors and text and text == _sse_in_order(direct)[0]  # streamed intact
    # the router verified the peer over the link with the signed probe, as on the LAN
    status = await (await http.get(a.root + "/v1/dvai/offload")).json()
    verified = next(p["verified"] for p in status["peers"] if p["deviceId"] == b_id)
    assert verified and verified[0]["tokPerS"] > 50
    # non-streamed answers travel the link too
    whole = await http.post(a.base_url + "/chat/completions", json={**request, "stream": False},
                            headers={"X-DVAI-Offload": "require"})
    assert whole.status == 200 and whole.headers["X-DVAI-Served-By"] == b_id
    assert (await whole.json())["choices"][0]["message"]["content"] == text


async def test_peer_killed_mid_stream_ends_with_an_error_and_done_within_3_s(
        linked_nodes: tuple[NodeProcess, NodeProcess, str], http: aiohttp.ClientSession) -> None:
    a, b, b_id = linked_nodes
    request = {**CHAT, "max_tokens": 4000}  # 20 s at 200 tok/s
    async with http.post(a.base_url + "/chat/completions", json=request,
                         headers={"X-DVAI-Offload": "require"}) as response:
        assert response.status == 200 and response.headers["X-DVAI-Served-By"] == b_id
        first = await response.content.readany()
        assert first.startswith(b"data: ")
        b.process.kill()
        killed = time.monotonic()
        rest = await asyncio.wait_for(response.content.read(), 10)
        ended = time.monotonic() - killed
    text, errors, done = _sse_in_order((first + rest).decode())
    assert done and errors and errors[-1]["code"] == "peer_failed", (first + rest)[-400:]
    assert ended < 3.0, f"the stream ended {ended:.2f} s after the peer died"


async def test_client_leaving_cancels_generation_on_the_peer(
        linked_nodes: tuple[NodeProcess, NodeProcess, str], http: aiohttp.ClientSession) -> None:
    a, b, b_id = linked_nodes
    request = {**CHAT, "max_tokens": 4000}
    async with http.post(a.base_url + "/chat/completions", json=request,
                         headers={"X-DVAI-Offload": "require"}) as response:
        assert response.status == 200 and response.headers["X-DVAI-Served-By"] == b_id
        await response.content.readany()
    # the client is gone → A cancels the stream over the link → B's handler stops generating
    rows: list[dict[str, object]] = []
    for _ in range(50):
        rows = [r for r in (await (await http.get(b.root + "/v1/dvai/audit")).json())["data"]
                if r["endpoint"] == "/v1/chat/completions" and r["completionTokens"] != 32]
        if rows:
            break
        await asyncio.sleep(0.1)
    assert rows, "the peer never finished the cancelled request"
    assert rows[0]["latencyMs"] < 5000 and (rows[0]["completionTokens"] or 0) < 1000, rows[0]


async def test_no_capable_device_reports_the_internet_path_truthfully(
        tmp_path: Path, rendezvous: str, http: aiohttp.ClientSession) -> None:  # noqa: F811
    a = start_node_process(tmp_path / "a", config_text=routed_config(rendezvous, 2))
    b = start_node_process(tmp_path / "b", config_text=routed_config(rendezvous, 200))
    try:
        body = {**CHAT, "stream": False}
        refused = await (await http.post(a.base_url + "/chat/completions", json=body,
                                         headers={"X-DVAI-Offload": "require"})).json()
        assert refused["error"]["rendezvousConfigured"] is True
        assert refused["error"]["pairedRemotePeers"] == 0
        await _pair_nodes(a, b, http)
        b.stop()  # paired, but not online: still refused, now with one remote peer paired
        refused = await (await http.post(a.base_url + "/chat/completions", json=body,
                                         headers={"X-DVAI-Offload": "require"})).json()
        assert refused["error"]["type"] == "no_capable_device" and refused["error"]["pairedRemotePeers"] == 1
    finally:
        a.stop()
        b.stop()


async def test_an_unpaired_device_can_neither_link_nor_be_served(
        serving: tuple[NodeProcess, PairedDevice], rendezvous: str,  # noqa: F811
        http: aiohttp.ClientSession) -> None:
    node, _ = serving
    node_id = await _node_id(node, http)
    stranger = DeviceIdentity.generate()  # online at the same rendezvous, with a key the node never issued
    key = os.urandom(32)
    links = LinkManager(device_id=stranger.device_id, pairing_key_for={node_id: key}.get, connect_timeout=4)
    presence = PresenceConnection(base_url=rendezvous, identity=stranger, session=http, links=links,
                                  watched=lambda: [node_id], on_presence=lambda _o: None, interval=0.3)
    await links.start()
    await presence.start()
    try:
        await asyncio.wait_for(presence.connected.wait(), 10)
        body = json.dumps(CHAT).encode()
        headers = sign_request_headers(key, stranger.device_id, stranger.device_id, "POST",
                                       "/v1/chat/completions", body)
        with pytest.raises(LinkUnavailableError):
            await links.link_for(node_id).open(LinkRequest("POST", "/v1/chat/completions", headers, body),
                                               connect_timeout=4)
    finally:
        await presence.stop()
        await links.stop()
    rows = (await (await http.get(node.root + "/v1/dvai/audit")).json())["data"]
    assert all(row["peerDeviceId"] != stranger.device_id for row in rows)
    peers = (await (await http.get(node.root + "/v1/dvai/peers")).json())["data"]
    assert all(peer["deviceId"] != stranger.device_id for peer in peers)
