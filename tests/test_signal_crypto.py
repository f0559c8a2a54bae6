"""Sealed signaling: tampering, replay, reordering, staleness and the wrong peer are refused."""

from __future__ import annotations

import base64

import pytest

from node.transport.signal_crypto import (
    SIGNAL_WINDOW_S,
    SignalRejectedError,
    SignalSealer,
    derive_signal_key,
    open_signal,
    seal_signal,
)

KEY = bytes(range(32))
A, B, C = "dvai-aaaa", "dvai-bbbb", "dvai-cccc"
NOW = 1_800_000_000.0


def pair(clock: list[float]) -> tuple[SignalSealer, SignalSealer]:
    return (SignalSealer(KEY, A, B, clock=lambda: clock[0]), SignalSealer(KEY, B, A, clock=lambda: clock[0]))


def test_round_trip_both_ways_and_ciphertext_hides_the_sdp() -> None:
    clock = [NOW]
    a, b = pair(clock)
    sdp = b"v=0\r\na=fingerprint:sha-256 AB:CD\r\n"
    envelope = a.seal(sdp)
    assert b"fingerprint" not in base64.urlsafe_b64decode(envelope[3:])
    assert b.open(envelope) == sdp
    assert a.open(b.seal(b"answer")) == b"answer"


def test_known_answer_derivation_is_stable() -> None:
    # Wire contract: both ends must derive the same key from the same pairing key.
    key = derive_signal_key(KEY)
    assert len(key) == 32 and key != KEY
    assert derive_signal_key(KEY) == key and derive_signal_key(bytes(32)) != key
    envelope = seal_signal(key, A, B, 7, b"x", nonce=bytes(12))
    assert open_signal(key, A, B, envelope) == (7, b"x")


def test_any_tampered_byte_is_refused() -> None:
    clock = [NOW]
    a, b = pair(clock)
    envelope = a.seal(b"offer with a fingerprint")
    raw = bytearray(base64.urlsafe_b64decode(envelope[3:]))
    for index in range(len(raw)):
        flipped = bytearray(raw)
        flipped[index] ^= 0x01
        forged = "s1." + base64.urlsafe_b64encode(bytes(flipped)).decode()
        with pytest.raises(SignalRejectedError):
            b.open(forged)
    assert b.open(envelope) == b"offer with a fingerprint"  # the genuine one still opens


def test_replay_and_reordering_are_refused() -> None:
    clock = [NOW]
    a, b = pair(clock)
    first, second = a.seal(b"1"), a.seal(b"2")
    assert b.open(second) == b"2"
    with pytest.raises(SignalRejectedError, match="replayed"):
        b.open(first)  # older than one already accepted
    with pytest.raises(SignalRejectedError, match="replayed"):
        b.open(second)


def test_counters_increase_even_when_the_clock_does_not() -> None:
    clock = [NOW]
    a, b = pair(clock)
    messages = [a.seal(str(i).encode()) for i in range(5)]
    assert [b.open(m) for m in messages] == [b"0", b"1", b"2", b"3", b"4"]


def test_stale_messages_are_refused_after_a_receiver_restart() -> None:
    clock = [NOW]
    a, _ = pair(clock)
    envelope = a.seal(b"old offer")
    clock[0] = NOW + SIGNAL_WINDOW_S + 1
    fresh_receiver = SignalSealer(KEY, B, A, clock=lambda: clock[0])  # remembers no counters
    with pytest.raises(SignalRejectedError, match="freshness"):
        fresh_receiver.open(envelope)


def test_wrong_peer_wrong_key_and_spoofed_sender_are_refused() -> None:
    clock = [NOW]
    a, _ = pair(clock)
    envelope = a.seal(b"for B only")
    as_c = SignalSealer(KEY, C, A, clock=lambda: clock[0])  # C holds the same key (worst case)
    with pytest.raises(SignalRejectedError):
        as_c.open(envelope)  # receiver is bound in
    from_c = SignalSealer(KEY, B, C, clock=lambda: clock[0])
    with pytest.raises(SignalRejectedError):
        from_c.open(envelope)  # the rendezvous claims it came from C
    other_key = SignalSealer(bytes(32), B, A, clock=lambda: clock[0])
    with pytest.raises(SignalRejectedError):
        other_key.open(envelope)


@pytest.mark.parametrize("envelope", ["", "s1.", "s1.!!!", "s2." + "A" * 60, "s1." + "A" * 40, "x" * 10, 5])
def test_malformed_envelopes(envelope: object) -> None:
    clock = [NOW]
    _, b = pair(clock)
    with pytest.raises(SignalRejectedError):
        b.open(envelope)  # type: ignore[arg-type]
