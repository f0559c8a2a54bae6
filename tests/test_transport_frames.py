"""The data-channel frame codec: round trips, every rejection, and fuzzing of the parser."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.transport.frames import (
    MAX_CHUNK_BYTES,
    MAX_FRAME_BYTES,
    BodyChunk,
    Cancel,
    End,
    FrameType,
    Ping,
    Pong,
    RequestHead,
    ResponseChunk,
    ResponseHead,
    StreamError,
    parse_frame,
    serialize_frame,
)

FRAMES = [
    RequestHead(1, "POST", "/v1/chat/completions?x=1", (("Content-Type", "application/json"),
                                                         ("X-DVAI-Nonce", "123.abc"))),
    BodyChunk(3, b"x" * MAX_CHUNK_BYTES),
    ResponseHead(2, 200, (("Content-Type", "text/event-stream"),)),
    ResponseChunk(2, b"data: {}\n\n"),
    End(5),
    StreamError(7, "peer_failed", "the engine stopped"),
    Cancel(9),
    Ping(2**63 - 1),
    Pong(0),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: object) -> None:
    data = serialize_frame(frame)  # type: ignore[arg-type]
    assert len(data) <= MAX_FRAME_BYTES
    assert parse_frame(data) == frame


def _wire(**fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",                                              # never-used msgpack byte
    _wire(t=1, s=1, m="POST", p="/", h={}) + b"\x00",     # trailing bytes
    msgpack.packb([1, 2, 3]),                             # not a map
    _wire(s=1),                                           # no type
    _wire(t=99, s=1),                                     # unknown type
    _wire(t="1", s=1),                                    # type as string
    _wire(t=True, s=1),                                   # bool is not an int here
    _wire(t=5, s=0),                                      # stream 0 is for control frames
    _wire(t=5, s=-1),
    _wire(t=5, s=2**31),
    _wire(t=8, s=1, n=1),                                 # ping off stream 0
    _wire(t=8, s=0, n=-1),
    _wire(t=1, s=1, m="BREW", p="/", h={}),
    _wire(t=1, s=1, m="POST", p="no-slash", h={}),
    _wire(t=1, s=1, m="POST", p="/a b", h={}),
    _wire(t=1, s=1, m="POST", p="/", h={"Bad Name": "x"}),
    _wire(t=1, s=1, m="POST", p="/", h={"X": "a\r\nInjected: 1"}),
    _wire(t=1, s=1, m="POST", p="/", h={"X": 1}),
    _wire(t=1, s=1, m="POST", p="/", h={f"H{i}": "v" for i in range(65)}),
    _wire(t=2, s=1, d="text, not bytes"),
    _wire(t=2, s=1, d=b""),                               # empty chunk
    _wire(t=3, s=2, c=99, h={}),
    _wire(t=3, s=2, c=600, h={}),
    _wire(t=6, s=2, e="Not A Code", x="m"),
    _wire(t=6, s=2, e="x", x="m" * 1025),
    _wire(t=1, s=1, m="POST", p="/", h=[["a", "b"]]),     # arrays are refused outright
    b"\x81" * 2000,                                       # deeply nested maps
], ids=range(28))
def test_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_frame(data)


def test_rejects_oversize_before_decoding() -> None:
    chunk = _wire(t=2, s=1, d=b"x" * MAX_FRAME_BYTES)
    assert len(chunk) > MAX_FRAME_BYTES
    with pytest.raises(ValueError, match="more than"):
        parse_frame(chunk)
    with pytest.raises(ValueError):
        parse_frame(_wire(t=2, s=1, d=b"x" * (MAX_CHUNK_BYTES + 1)))  # under the frame cap, over the chunk cap


def test_serialize_refuses_what_parse_would_refuse() -> None:
    for frame in (BodyChunk(1, b"x" * (MAX_CHUNK_BYTES + 1)), RequestHead(1, "POST", "bad"),
                  ResponseHead(2, 42), Ping(1, stream=3), End(0), StreamError(1, "UPPER", "")):
        with pytest.raises(ValueError):
            serialize_frame(frame)  # type: ignore[arg-type]


def test_unknown_keys_are_ignored_for_later_fields() -> None:
    assert parse_frame(_wire(t=5, s=3, future="field")) == End(3)


def test_type_tags_are_stable() -> None:
    # Wire contract: changing a tag breaks every deployed peer.
    assert [int(t) for t in FrameType] == list(range(1, 10))
    assert msgpack.unpackb(serialize_frame(Cancel(1))) == {"t": 7, "s": 1}


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_only_raise_value_error(data: bytes) -> None:
    try:
        frame = parse_frame(data)
    except ValueError:
        return
    assert parse_frame(serialize_frame(frame)) == frame


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**64 - 1), st.text(max_size=20),
                     st.binary(max_size=20), st.floats(allow_nan=False))
_values = st.recursive(_scalars, lambda inner: st.dictionaries(st.text(max_size=3), inner, max_size=4),
                       max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({"t": st.integers(0, 10), "s": st.integers(-1, 2**31)},
                             optional={"m": _values, "p": _values, "h": _values, "d": _values, "c": _values,
                                       "e": _values, "x": _values, "n": _values}))
def test_fuzz_structured_maps(wire: dict[str, object]) -> None:
    """Maps that look like frames, with every field of any type: ValueError or a valid frame."""
    try:
        frame = parse_frame(msgpack.packb(wire, use_bin_type=True))
    except ValueError:
        return
    assert parse_frame(serialize_frame(frame)) == frame
