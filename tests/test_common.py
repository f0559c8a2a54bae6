"""node/common: the one base64url rule, the one error body, the clock, the EWMA, the token bucket,
the stop signal."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.common.b64 import b64url_decode, b64url_encode
from node.common.clock import ms_from_seconds, unix_ms
from node.common.errors import (
    ModelNotFoundError,
    RateLimitedError,
    error_body,
    http_error_body,
    http_error_headers,
)
from node.common.ewma import ewma
from node.common.signals import wait_for_stop_signal
from node.common.tokenbucket import TokenBucket


@given(st.binary(max_size=100))
def test_b64url_round_trips_unpadded_and_padded(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64url_decode(text) == data
    assert b64url_decode(base64.urlsafe_b64encode(data).decode()) == data  # exact padding is fine


@pytest.mark.parametrize("text", [
    "AB+C",      # standard alphabet
    "AB/C",
    "AB C",      # whitespace (Python's own decoder skips it silently)
    "ABC*",
    "A",         # no byte string encodes to one character
    "AB=",       # partial padding
    "AB===",     # too much padding
    "ABC==",     # padding that does not complete a multiple of four
    "AB=C",      # padding inside
    "AF",        # unused low bits set: "AA" is the canonical spelling of b"\x00"
    "AAF",
])
def test_b64url_refuses_anything_but_the_canonical_spelling(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


def test_b64url_refuses_non_strings() -> None:
    with pytest.raises(ValueError):
        b64url_decode(b"AAAA")  # type: ignore[arg-type]


def test_one_error_body_shape_for_errors_and_bare_statuses() -> None:
    assert error_body("boom") == {"error": {"message": "boom", "type": "server_error",
                                            "code": "internal_error", "param": None}}
    assert ModelNotFoundError("x").to_body()["error"] == {
        "message": "The model 'x' does not exist on this node", "type": "invalid_request_error",
        "code": "model_not_found", "param": "model"}
    assert http_error_body(405, "no") == error_body("no", error_type="invalid_request_error",
                                                    code="method_not_allowed")
    assert http_error_body(422, "?")["error"]["type"] == "invalid_request_error"
    assert http_error_body(502, "?")["error"] == {"message": "?", "type": "server_error",
                                                  "code": "http_error", "param": None}
    assert RateLimitedError("slow", retry_after=2.4).headers == {"Retry-After": "2"}
    assert http_error_headers({"Allow": "GET", "Content-Type": "text/plain", "retry-after": "3"}) == {
        "Allow": "GET", "retry-after": "3"}


def test_the_clock_is_integer_unix_ms() -> None:
    before = time.time()
    now = unix_ms()
    assert isinstance(now, int) and abs(now - before * 1000) < 5_000
    assert ms_from_seconds(1.5) == 1500


def test_ewma_first_sample_sets_it_then_alpha_weighs_the_newest() -> None:
    assert ewma(None, 40.0, 0.3) == 40.0
    assert ewma(40.0, 50.0, 0.3) == pytest.approx(43.0)
    assert ewma(50.0, 200.0, 1.0) == 200.0


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=2.0, now=0.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token in half a second
    assert not bucket.is_full(0.5) and bucket.is_full(1.0)
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(1.0)  # capped at the burst


async def test_wait_for_stop_signal_ends_on_sigint_or_the_event_and_removes_its_handlers() -> None:
    waiting = asyncio.create_task(wait_for_stop_signal())
    await asyncio.sleep(0.01)  # the handlers are installed
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.wait_for(waiting, 5)
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)  # already removed
    stop = asyncio.Event()
    waiting = asyncio.create_task(wait_for_stop_signal(stop))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    stop.set()
    await asyncio.wait_for(waiting, 5)
