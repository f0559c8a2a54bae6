"""The forwarder, the verification probe and the event splitter, against in-process stub peers.

The stub peers here are small aiohttp servers on loopback that stream like a node (or
misbehave on purpose: stall, cut the stream, answer errors); the code under test is the
real ``Forwarder``, ``measure_decode_rate``, ``PeerVerifier`` and ``EventSplitter``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from node.api.sse import write_peer_answer
from node.common.sse import EventSplitter, OversizeEventError, encode_event
from node.constants import FORWARD_MAX_EVENT_BYTES
from node.offload.forward import (
    ForwardCall,
    Forwarder,
    ForwardFailed,
    ForwardResult,
    ForwardSettings,
    ForwardStatus,
    ForwardTarget,
)
from node.offload.verify import (
    PeerVerifier,
    ProbeTarget,
    Verification,
    VerificationFailed,
    measure_decode_rate,
)
from node.pairing.store import Pairing
from node.security.signing import NonceCache, verify_signed_request
from node.transport.http_link import HttpPeerLink

KEY = bytes(range(32))
PAIRING = Pairing(peer_device_id="peer-1", peer_device_name="peer", our_app_id="me", key=KEY, via="lan-handshake",
                  paired_at=0, role="outbound")
PEER_VIEW = Pairing(peer_device_id="me", peer_device_name="me", peer_app_id="me", key=KEY, via="lan-handshake",
                    paired_at=0, role="inbound")
"""the same pairing as the peer stores it: it verifies what we sign with PAIRING."""


def chunk(text: str) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text},
                                                                       "finish_reason": None}]}


# --- the event splitter ------------------------------------------------------------------


def test_events_are_split_whole_across_arbitrary_chunk_boundaries() -> None:
    stream = encode_event(chunk("a")) + encode_event(chunk("")) + encode_event(
        {"choices": [], "usage": {"completion_tokens": 1}}) + encode_event(
        {"error": {"code": "x"}}) + b"data: [DONE]\n\n"
    for size in (1, 2, 7, len(stream)):
        splitter = EventSplitter(max_event_bytes=FORWARD_MAX_EVENT_BYTES)
        events = []
        for i in range(0, len(stream), size):
            events += splitter.feed(stream[i:i + size])
        assert b"".join(e.raw for e in events) == stream and splitter.pending == 0
        assert [e.text for e in events] == ["a", "", "", "", ""]
        assert events[2].usage == {"completion_tokens": 1} and events[3].error == {"code": "x"}
        assert [e.done for e in events] == [False, False, False, False, True]


def test_an_endless_event_is_refused_and_garbage_is_relayed_as_no_text() -> None:
    splitter = EventSplitter(max_event_bytes=100)
    with pytest.raises(OversizeEventError):
        splitter.feed(b"data: " + b"x" * 200)
    (event,) = EventSplitter(max_event_bytes=FORWARD_MAX_EVENT_BYTES).feed(b"data: {not json\n\n")
    assert event.raw == b"data: {not json\n\n" and not event.has_text and not event.done


# --- stub peers ----------------------------------------------------------------------------


Behaviour = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


async def start_peer(behaviour: Behaviour, *, seen: list[web.Request] | None = None,
                     status: int = 200) -> TestServer:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if seen is not None:
            seen.append(request)
        if status != 200:
            return web.json_response({"error": {"message": "no", "type": "x", "code": "nope"}}, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await behaviour(request, response)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_post("/v1/completions", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def tokens_at(rate: float, count: int, *, then_stall: float | None = None) -> Behaviour:
    async def behaviour(request: web.Request, response: web.StreamResponse) -> None:
        for i in range(count):
            await asyncio.sleep(1 / rate)
            await response.write(encode_event(chunk(f"t{i} ")))
        if then_stall is not None:
            await asyncio.sleep(then_stall)
            return
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()

    return behaviour


async def relay_through(peer: TestServer | str, settings: ForwardSettings, *, stream: bool = True,
                        ) -> tuple[TestClient, list[Any]]:
    """Our node, reduced to its forwarding step, in front of ``peer``."""
    results: list[Any] = []
    session = aiohttp.ClientSession()
    forwarder = Forwarder(device_id="me", settings=settings)
    url = peer if isinstance(peer, str) else str(peer.make_url("/v1"))
    target = ForwardTarget("peer-1", HttpPeerLink(session, url), PAIRING)

    async def handler(request: web.Request) -> web.StreamResponse:
        call = ForwardCall(request.raw_path, await request.read(), stream)
        try:
            answer = await forwarder.open(target, call, on_finished=lambda done: results.append(done.result))
        except ForwardFailed as exc:
            results.append(ForwardResult(ForwardStatus.FAILED, error=str(exc)))
            return web.json_response({"fell_back": str(exc)}, status=599)
        return await write_peer_answer(request, answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)

    async def close_session(_app: web.Application) -> None:
        await session.close()

    app.on_cleanup.append(close_session)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client, results


FAST = ForwardSettings(connect_timeout=1.0, first_byte_timeout=2.0, read_timeout=0.3)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


# --- the forwarder -------------------------------------------------------------------------


async def test_a_stream_is_relayed_signed_marked_and_event_by_event() -> None:
    seen: list[web.Request] = []
    peer = await start_peer(tokens_at(50, 10), seen=seen)
    client, results = await relay_through(peer, FAST)
    try:
        response = await client.post("/v1/chat/completions", json=BODY)
        arrivals, raw = [], b""
        async for part in response.content.iter_any():
            arrivals.append(time.perf_counter())
            raw += part
        assert response.status == 200 and response.headers["X-DVAI-Served-By"] == "peer-1"
        assert raw == b"".join(encode_event(chunk(f"t{i} ")) for i in range(10)) + b"data: [DONE]\n\n"
        assert arrivals[-1] - arrivals[0] > 0.1  # streamed, not delivered in one piece at the end
        (request,) = seen
        assert request.headers["X-DVAI-Offload"] == "never" and request.headers["X-DVAI-Hop"] == "me"
        attribution = verify_signed_request(
            request.headers, "POST", request.raw_path, json.dumps(BODY).encode(),
            lookup_key=lambda _device, _app: PEER_VIEW, nonces=NonceCache(), now_ms=int(time.time() * 1000))
        assert attribution.signed and attribution.peer_device_id == "me"
        (result,) = results
        assert result.status is ForwardStatus.SERVED and result.tokens == 10
        rate = result.outcome.decode_tok_per_s
        assert rate is not None and 40 < rate < 60  # (n-1)/(t_last-t_first) ≈ 50
    finally:
        await client.close()
        await peer.close()


async def test_a_peer_that_stalls_mid_stream_ends_the_stream_with_an_error_event() -> None:
    peer = await start_peer(tokens_at(50, 3, then_stall=5))
    client, results = await relay_through(peer, FAST)
    try:
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json=BODY)
        text = await response.text()
        assert time.monotonic() - started < 2.0  # the read timeout (0.3 s), not the 5 s stall
        events = [e for e in text.split("\n\n") if e]
        assert len(events) == 5 and events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data: "):])["error"]
        assert error["code"] == "peer_failed" and error["type"] == "server_error" and "sent nothing" in error["message"]
        assert results[0].status is ForwardStatus.BROKEN and results[0].tokens == 3
    finally:
        await client.close()
        await peer.close()


async def test_a_stream_cut_before_done_is_broken_and_a_torn_event_is_never_relayed() -> None:
    async def torn(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(encode_event(chunk("a")) + b'data: {"choi')
        request.transport.close()  # type: ignore[union-attr]

    peer = await start_peer(torn)
    client, results = await relay_through(peer, FAST)
    try:
        text = await (await client.post("/v1/chat/completions", json=BODY)).text()
        events = [e for e in text.split("\n\n") if e]
        assert events[0] == 'data: ' + json.dumps(chunk("a"), separators=(",", ":"))
        assert json.loads(events[1][len("data: "):])["error"]["code"] == "peer_failed"
        assert events[2:] == ["data: [DONE]"]
        assert results[0].status is ForwardStatus.BROKEN
    finally:
        await client.close()
        await peer.close()


@pytest.mark.parametrize("status", [401, 500, 503])
async def test_an_error_status_is_a_failure_before_the_first_byte(status: int) -> None:
    peer = await start_peer(tokens_at(50, 1), status=status)
    client, results = await relay_through(peer, FAST)
    try:
        response = await client.post("/v1/chat/completions", json=BODY)
        assert response.status == 599  # our handler's "fell back" marker: nothing was relayed
        assert results[0].status is ForwardStatus.FAILED and f"HTTP {status}" in results[0].error
    finally:
        await client.close()
        await peer.close()


async def test_a_refused_connection_is_a_failure_before_the_first_byte() -> None:
    peer = await start_peer(tokens_at(50, 1))
    url = str(peer.make_url("/v1"))
    await peer.close()  # nothing listens there any more
    client, results = await relay_through(url, FAST)
    try:
        assert (await client.post("/v1/chat/completions", json=BODY)).status == 599
        assert results[0].status is ForwardStatus.FAILED
    finally:
        await client.close()


async def test_a_non_streamed_answer_passes_through_unchanged() -> None:
    answer = b'{"id":"x","object":"chat.completion","usage":{"prompt_tokens":3,"completion_tokens":7}}'

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    peer = TestServer(app, host="127.0.0.1")
    await peer.start_server()
    client, results = await relay_through(peer, FAST, stream=False)
    try:
        response = await client.post("/v1/chat/completions", json={**BODY, "stream": False})
        assert await response.read() == answer and response.headers["X-DVAI-Served-By"] == "peer-1"
        assert results[0].tokens == 7 and results[0].outcome.prompt_tokens == 3
    finally:
        await client.close()
        await peer.close()


async def test_a_client_that_goes_away_closes_the_upstream_request() -> None:
    upstream_closed = asyncio.Event()

    async def endless(request: web.Request, response: web.StreamResponse) -> None:
        try:
            while True:
                await asyncio.sleep(0.02)
                await response.write(encode_event(chunk("x")))
        except (asyncio.CancelledError, ConnectionResetError):
            upstream_closed.set()
            raise

    peer = await start_peer(endless)
    client, _ = await relay_through(peer, FAST)
    try:
        response = await client.post("/v1/chat/completions", json=BODY)
        await response.content.readany()
        response.close()
        await asyncio.wait_for(upstream_closed.wait(), 2.0)
    finally:
        await client.close()
        await peer.close()


# --- the verification probe ----------------------------------------------------------------


def target_of(peer: TestServer | str, session: aiohttp.ClientSession) -> ProbeTarget:
    url = peer if isinstance(peer, str) else str(peer.make_url("/v1"))
    return ProbeTarget("peer-1", HttpPeerLink(session, url), PAIRING, "m")


async def test_the_probe_measures_the_rate_that_arrives() -> None:
    seen: list[web.Request] = []
    peer = await start_peer(tokens_at(40, 32), seen=seen)
    async with aiohttp.ClientSession() as session:
        rate, count = await measure_decode_rate(target_of(peer, session), self_device_id="me", time_limit=5,
                                                connect_timeout=1)
    await peer.close()
    assert count == 32 and rate is not None and 33 < rate < 45
    body = json.loads(await seen[0].read())
    assert body["stream"] is True and body["max_tokens"] == 32 and seen[0].path == "/v1/completions"
    assert seen[0].headers["X-DVAI-Offload"] == "never" and "X-DVAI-Signature" in seen[0].headers


async def test_a_slow_peer_is_measured_without_waiting_for_its_whole_answer() -> None:
    peer = await start_peer(tokens_at(5, 32))  # 6.4 s for the whole probe
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        rate, count = await measure_decode_rate(target_of(peer, session), self_device_id="me", time_limit=10,
                                                connect_timeout=1, give_up_below=20)
    await peer.close()
    # cut once 31 tokens at 20 tok/s (×1.1) could no longer arrive: ~1.9 s after the first token
    assert time.monotonic() - started < 3.0
    assert rate is not None and 3.5 < rate < 6 and count < 32


async def test_probe_failures() -> None:
    one_token = await start_peer(tokens_at(50, 1))
    closed = await start_peer(tokens_at(50, 1))
    refused = str(closed.make_url("/v1"))
    await closed.close()
    erroring = await start_peer(tokens_at(50, 1), status=401)
    async with aiohttp.ClientSession() as session:
        probe = {"self_device_id": "me", "time_limit": 2, "connect_timeout": 1}
        assert await measure_decode_rate(target_of(one_token, session), **probe) == (None, 1)  # inconclusive
        with pytest.raises(VerificationFailed):
            await measure_decode_rate(target_of(refused, session), **probe)
        with pytest.raises(VerificationFailed, match="401"):
            await measure_decode_rate(target_of(erroring, session), **probe)
    await one_token.close()
    await erroring.close()


# --- the verifier ----------------------------------------------------------------------------


async def test_the_verifier_is_single_flight_backs_off_and_stops_waiting_when_enough() -> None:
    calls: list[str] = []
    gates = {"fast": 0.05, "slow": 5.0, "odd": 0.01}

    async def measure(target: ProbeTarget) -> tuple[float | None, int]:
        calls.append(target.device_id)
        await asyncio.sleep(gates[target.device_id])
        if target.device_id == "odd":
            return None, 1
        return (40.0 if target.device_id == "fast" else 5.0), 32

    now = [1000.0]
    verifier = PeerVerifier(measure, clock=lambda: now[0], retry_after=30)
    targets = [ProbeTarget(d, "http://x/v1", PAIRING, "m") for d in ("fast", "slow", "odd")]
    started = time.monotonic()
    await verifier.verify(targets, wait=3, enough=lambda: verifier.get("fast", "m") is not None)
    assert time.monotonic() - started < 1.0  # did not wait for the slow peer
    assert verifier.get("fast", "m") == Verification("fast", "m", 40.0, 32, 1000.0)
    await verifier.verify(targets[:1], wait=1)  # a finished probe is not joined: a new one runs
    task_a, task_b = verifier.start(targets[1]), verifier.start(targets[1])
    assert task_a is task_b and calls.count("slow") == 1  # single flight
    assert not verifier.may_probe("odd", "m", now[0]) and verifier.last_failure("odd", "m") is not None
    now[0] += 31
    assert verifier.may_probe("odd", "m", now[0])
    await verifier.close()
    assert task_a.cancelled()
