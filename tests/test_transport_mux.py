"""The stream multiplexer over an in-memory channel pair: streams, flow control, cancel,
and a reader that closes the link on hostile frames."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import msgpack
import pytest

from node.constants import LINK_MAX_STREAMS, LINK_SEND_HIGH_WATER_BYTES
from node.transport.frames import (
    MAX_FRAME_BYTES,
    BodyChunk,
    End,
    RequestHead,
    ResponseChunk,
    ResponseHead,
    parse_frame,
    serialize_frame,
)
from node.transport.mux import (
    InboundRequest,
    LinkClosedError,
    ResponseWriter,
    StreamFailedError,
    StreamMux,
)

from .transport_support import channel_pair

pytestmark = pytest.mark.timeout(30)


async def echo(request: InboundRequest, writer: ResponseWriter) -> None:
    """Answers with the request's digest header, then the body back in 1000-byte writes."""
    body = await request.body.read()
    writer.head(200, {"X-Path": request.path, "X-Sha": hashlib.sha256(body).hexdigest()})
    for start in range(0, len(body), 1000):
        await writer.write(body[start:start + 1000])
    await writer.end()


def linked(on_a=None, on_b=None, **options):  # type: ignore[no-untyped-def]
    a, b = channel_pair()
    a.mux = StreamMux(a, initiator=True, on_request=on_a, **options)
    b.mux = StreamMux(b, initiator=False, on_request=on_b, **options)
    return a, b


async def read_all(response) -> bytes:  # type: ignore[no-untyped-def]
    parts = []
    while chunk := await response.read_chunk():
        parts.append(chunk)
    response.release()
    return b"".join(parts)


async def test_many_concurrent_streams_both_ways_arrive_intact() -> None:
    a, b = linked(on_a=echo, on_b=echo)
    assert a.mux and b.mux
    bodies = [os.urandom(size) for size in (0, 1, 61_440, 61_441, 1_000_000)] * 4

    async def one(mux: StreamMux, body: bytes, index: int) -> None:
        response = await mux.open("POST", f"/v1/echo?i={index}", {"Content-Type": "x"}, body)
        assert response.status == 200
        assert response.headers["X-Path"] == f"/v1/echo?i={index}"
        assert response.headers["X-Sha"] == hashlib.sha256(body).hexdigest()
        assert await read_all(response) == body

    await asyncio.gather(*(one(a.mux if i % 2 else b.mux, body, i) for i, body in enumerate(bodies)))
    assert a.mux.open_streams == 0 and b.mux.open_streams == 0
    assert not a.mux.closed and not b.mux.closed
    assert max(len(frame) for frame in a.sent + b.sent) <= MAX_FRAME_BYTES


async def test_fast_producer_waits_for_the_channel_to_drain() -> None:
    produced = 0

    async def flood(request: InboundRequest, writer: ResponseWriter) -> None:
        nonlocal produced
        writer.head(200, {})
        for _ in range(200):  # 12 MB
            await writer.write(b"z" * 61_440)
            produced += 61_440
        await writer.end()

    a, b = linked(on_b=flood)
    assert a.mux
    b.paused = True  # b's queue does not drain: as if the network stalled
    opening = asyncio.create_task(a.mux.open("POST", "/flood", {}, b""))
    await asyncio.sleep(0.2)
    assert b.buffered_amount <= LINK_SEND_HIGH_WATER_BYTES + MAX_FRAME_BYTES
    assert produced < 2 * LINK_SEND_HIGH_WATER_BYTES  # the producer is parked, not buffering 12 MB
    b.resume()
    response = await opening
    assert len(await read_all(response)) == 200 * 61_440
    assert b.max_buffered <= LINK_SEND_HIGH_WATER_BYTES + MAX_FRAME_BYTES


async def test_cancel_stops_the_peer_handler() -> None:
    stopped = asyncio.Event()
    writes = 0

    async def endless(request: InboundRequest, writer: ResponseWriter) -> None:
        nonlocal writes
        writer.head(200, {"Content-Type": "text/event-stream"})
        try:
            while True:
                await writer.write(b"data: tok\n\n")
                writes += 1
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            stopped.set()
            raise

    a, b = linked(on_b=endless)
    assert a.mux and b.mux
    response = await a.mux.open("POST", "/v1/chat/completions", {}, b"{}")
    assert await response.read_chunk() == b"data: tok\n\n"
    response.cancel()
    await asyncio.wait_for(stopped.wait(), 2)
    seen = writes
    await asyncio.sleep(0.1)
    assert writes == seen
    assert b.mux.open_streams == 0 and a.mux.open_streams == 0
    assert not a.mux.closed and not b.mux.closed  # late chunks for the cancelled stream are fine


async def test_stream_errors_and_refusals_leave_the_link_up() -> None:
    async def failing(request: InboundRequest, writer: ResponseWriter) -> None:
        if request.path == "/boom":
            raise RuntimeError("bug")
        writer.head(200, {})
        await writer.write(b"half")
        await writer.fail("peer_failed", "engine died")

    a, b = linked(on_b=failing, max_request_body=100)
    assert a.mux
    with pytest.raises(StreamFailedError) as caught:
        await a.mux.open("POST", "/boom", {}, b"")
    assert caught.value.code == "internal_error"
    too_large = await a.mux.open("POST", "/big", {}, b"x" * 101)
    assert too_large.status == 413  # the HTTP API's answer, OpenAI-shaped
    assert json.loads(await read_all(too_large))["error"]["code"] == "payload_too_large"
    response = await a.mux.open("POST", "/half", {}, b"")
    assert await response.read_chunk() == b"half"
    with pytest.raises(StreamFailedError, match="engine died"):
        await response.read_chunk()
    response.cancel()
    assert not a.mux.closed
    assert await a.mux.ping(1) < 1


async def test_request_bodies_reach_the_handler_as_they_arrive() -> None:
    seen: list[tuple[int, bool]] = []

    async def streaming(request: InboundRequest, writer: ResponseWriter) -> None:
        total = 0
        async for chunk in request.body:
            total += len(chunk)
            seen.append((total, request.body.ended))
        writer.head(200, {"X-Total": str(total)})
        await writer.end()

    a, _ = linked(on_a=streaming)
    assert a.mux
    a.mux.feed(serialize_frame(RequestHead(2, "POST", "/")))
    for _ in range(3):
        a.mux.feed(serialize_frame(BodyChunk(2, b"x" * 60_000)))
        await asyncio.sleep(0.01)  # the handler runs between chunks
    assert seen == [(60_000, False), (120_000, False), (180_000, False)]  # before the body's end
    a.mux.feed(serialize_frame(End(2)))
    await asyncio.sleep(0.01)
    heads = [frame for frame in map(parse_frame, a.sent) if isinstance(frame, ResponseHead)]
    assert dict(heads[0].headers)["X-Total"] == "180000" and a.mux.open_streams == 0


async def test_a_large_body_streams_through_and_the_cap_is_enforced_as_bytes_arrive() -> None:
    big = os.urandom(3 * 1024 * 1024 + 17)  # 49 chunks
    a, b = linked(on_b=echo, max_request_body=4 * 1024 * 1024)
    assert a.mux and b.mux
    response = await a.mux.open("POST", "/big", {}, big)
    assert response.status == 200 and response.headers["X-Sha"] == hashlib.sha256(big).hexdigest()
    assert await read_all(response) == big
    assert a.max_buffered <= LINK_SEND_HIGH_WATER_BYTES + MAX_FRAME_BYTES  # the sender waited for the channel

    sent_before = len(a.sent)
    response = await a.mux.open("POST", "/bigger", {}, os.urandom(8 * 1024 * 1024))
    assert response.status == 413
    assert json.loads(await read_all(response))["error"]["type"] == "invalid_request_error"
    # refused once the cap was crossed, long before the end: the sender stopped sending
    assert len(a.sent) - sent_before < 8 * 1024 * 1024 // 61_440
    await asyncio.sleep(0.01)  # the end of the cut-short body arrives: the peer forgets the stream
    assert not a.mux.closed and not b.mux.closed and b.mux.open_streams == 0


async def test_node_that_serves_nothing_refuses_streams() -> None:
    a, b = linked()
    assert a.mux
    with pytest.raises(StreamFailedError, match="not_serving"):
        await a.mux.open("GET", "/v1/models", {}, b"")


async def test_link_closing_fails_open_streams() -> None:
    started = asyncio.Event()

    async def slow(request: InboundRequest, writer: ResponseWriter) -> None:
        writer.head(200, {})
        started.set()
        await asyncio.sleep(30)

    a, b = linked(on_b=slow)
    assert a.mux and b.mux
    response = await a.mux.open("POST", "/slow", {}, b"")
    pending = asyncio.create_task(a.mux.open("POST", "/slow", {}, b""))
    await started.wait()
    b.mux.close("peer went away")
    with pytest.raises(LinkClosedError):
        await asyncio.wait_for(response.read_chunk(), 2)
    with pytest.raises(LinkClosedError):
        await asyncio.wait_for(pending, 2)
    with pytest.raises(LinkClosedError):
        await a.mux.open("POST", "/after", {}, b"")


# -- hostile frames: the reader closes the link -------------------------------------------


def _raw(**fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


HOSTILE = {
    "oversize": b"\x00" * (MAX_FRAME_BYTES + 1),
    "garbage": b"\xc1\xc1\xc1",
    "text": "not binary",
    "unknown stream": serialize_frame(BodyChunk(99, b"x")),
    "response for a stream we never opened": serialize_frame(ResponseChunk(1, b"x")),
    "wrong direction": serialize_frame(RequestHead(1, "POST", "/")),  # odd ids are ours (initiator)
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_frame_closes_the_link(name: str) -> None:
    a, b = linked(on_a=echo)
    assert a.mux
    a.mux.feed(HOSTILE[name])  # type: ignore[arg-type]
    assert a.mux.closed and "protocol error" in (a.mux.close_reason or "")
    assert a.closed


async def test_out_of_order_frames_close_the_link() -> None:
    for frames in (
        [RequestHead(2, "POST", "/"), End(2), BodyChunk(2, b"late")],  # body after the end
        [RequestHead(4, "POST", "/"), RequestHead(2, "POST", "/")],    # ids going backwards
        [RequestHead(2, "POST", "/"), RequestHead(2, "POST", "/")],    # id reused
    ):
        a, _ = linked(on_a=echo)
        assert a.mux
        for frame in frames:
            a.mux.feed(serialize_frame(frame))
        assert a.mux.closed, frames


async def test_response_chunk_before_head_closes_the_link() -> None:
    a, b = channel_pair()
    a.mux = StreamMux(a, initiator=True)
    b.paused = True  # nobody answers
    opening = asyncio.create_task(a.mux.open("POST", "/", {}, b""))
    await asyncio.sleep(0.01)
    a.mux.feed(serialize_frame(ResponseChunk(1, b"early")))
    assert a.mux.closed
    with pytest.raises(LinkClosedError):
        await opening


async def test_ten_thousand_streams_close_the_link_and_free_everything() -> None:
    gate = asyncio.Event()

    async def held(request: InboundRequest, writer: ResponseWriter) -> None:
        await gate.wait()

    a, b = linked(on_a=held)
    assert a.mux
    for index in range(10_000):
        if a.mux.closed:
            break
        a.mux.feed(serialize_frame(RequestHead(2 * index + 2, "POST", "/")))
    assert a.mux.closed
    assert index == LINK_MAX_STREAMS + 1  # the stream past the limit (index 64) closed it
    assert a.mux.open_streams == 0


async def test_other_links_are_unaffected_by_a_hostile_one() -> None:
    good_a, _good_b = linked(on_b=echo)
    bad_a, _bad_b = linked(on_a=echo)
    assert good_a.mux and bad_a.mux
    bad_a.mux.feed(b"\xc1")
    response = await good_a.mux.open("POST", "/ok", {}, b"fine")
    assert await read_all(response) == b"fine"


async def test_ping_flood_does_not_queue_pongs_past_high_water() -> None:
    a, b = linked()
    assert a.mux
    a.paused = True
    ping = _raw(t=8, s=0, n=1)
    for _ in range(LINK_SEND_HIGH_WATER_BYTES // 8 + 1000):
        a.mux.feed(ping)
    assert a.buffered_amount <= LINK_SEND_HIGH_WATER_BYTES + 64
    assert not a.mux.closed


async def test_bodies_in_flight_are_bounded_per_link() -> None:
    from node.constants import LINK_MAX_INBOUND_BODY_BYTES

    a, _ = linked(on_a=echo, max_request_body=LINK_MAX_INBOUND_BODY_BYTES)
    assert a.mux
    chunk = b"x" * 61_440
    streams = 0
    while not a.mux.closed and streams < 64:  # many streams, none finished, each under its own limit
        stream = 2 * streams + 2
        a.mux.feed(serialize_frame(RequestHead(stream, "POST", "/")))
        for _ in range(16):
            a.mux.feed(serialize_frame(BodyChunk(stream, chunk)))
        streams += 1
    assert a.mux.closed and "bodies" in (a.mux.close_reason or "")
    assert streams * 16 * len(chunk) <= LINK_MAX_INBOUND_BODY_BYTES + 16 * len(chunk)


async def test_a_peer_acknowledging_our_upload_is_alive_though_it_sends_no_frame() -> None:
    clock = [0.0]
    a, _ = channel_pair()
    a.mux = StreamMux(a, initiator=True, monotonic=lambda: clock[0])
    a.peer_acks = 7  # type: ignore[attr-defined]  # the transport's acknowledged position
    a.mux.refresh_liveness()
    clock[0] = 5.0
    a.mux.refresh_liveness()
    assert a.mux.last_received == 0.0  # nothing new acknowledged: silence, as a dead peer's
    a.peer_acks = 9  # type: ignore[attr-defined]
    a.mux.refresh_liveness()
    assert a.mux.last_received == 5.0  # our bytes reached it: alive
