"""Signaling messages sealed with the pairing key, so the rendezvous relays them blind.

Two QR-paired devices exchange WebRTC offers and answers through the rendezvous'
presence relay. Each message is sealed with ChaCha20-Poly1305 under a key derived
from their pairing key::

    signal key = HKDF-SHA256(ikm = pairing key, salt = none, info = "dvai-signal-v1", 32 bytes)
    aad        = lp("dvai-signal-v1") lp(sender id) lp(receiver id) counter (8 bytes, big-endian)
    envelope   = "s1." base64url( counter ‖ nonce (12 random bytes) ‖ ciphertext+tag )

(``lp(x)``: 2-byte big-endian length, then x.) The counter is the sender's clock in
microseconds, forced strictly increasing; a receiver accepts a counter only if it is
greater than every counter it accepted from that sender and within
``SIGNAL_WINDOW_S`` of its own clock. So a rendezvous cannot read the SDP, cannot alter
it (and with it the DTLS fingerprint: the link would fail, not be intercepted), cannot
replay or reorder messages, and cannot pass one device's message off as another's or
deliver it to a third device: sender and receiver are bound into the tag.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..constants import LINK_MAX_SIGNAL_BYTES

__all__ = [
    "SIGNAL_LABEL",
    "SIGNAL_WINDOW_S",
    "SignalRejectedError",
    "SignalSealer",
    "derive_signal_key",
    "open_signal",
    "seal_signal",
]

SIGNAL_LABEL = b"dvai-signal-v1"
ENVELOPE_PREFIX = "s1."
SIGNAL_WINDOW_S = 120.0
"""seconds a signaling message's counter may differ from the receiver's clock: bounds how long a
captured message could be replayed to a receiver that restarted (and so forgot its counters)."""
_NONCE_BYTES = 12
_COUNTER = struct.Struct(">Q")


class SignalRejectedError(ValueError):
    """A signaling message that is not authentic, not for us, replayed, stale or malformed."""


def derive_signal_key(pairing_key: bytes) -> bytes:
    """The AEAD key for signaling between the two holders of ``pairing_key``."""
    if len(pairing_key) < 16:
        raise ValueError("pairing key is too short")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SIGNAL_LABEL).derive(pairing_key)


def _aad(sender: str, receiver: str, counter: int) -> bytes:
    parts = (SIGNAL_LABEL, sender.encode(), receiver.encode())
    return b"".join(struct.pack(">H", len(p)) + p for p in parts) + _COUNTER.pack(counter)


def seal_signal(key: bytes, sender: str, receiver: str, counter: int, plaintext: bytes,
                nonce: bytes | None = None) -> str:
    """The envelope for ``plaintext`` from ``sender`` to ``receiver`` (pure given ``nonce``)."""
    nonce = os.urandom(_NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != _NONCE_BYTES or not 0 <= counter < 2**64:
        raise ValueError("bad nonce or counter")
    sealed = ChaCha20Poly1305(key).encrypt(nonce, plaintext, _aad(sender, receiver, counter))
    envelope = ENVELOPE_PREFIX + base64.urlsafe_b64encode(_COUNTER.pack(counter) + nonce + sealed).decode()
    if len(envelope) > LINK_MAX_SIGNAL_BYTES:
        raise ValueError(f"signaling message is larger than {LINK_MAX_SIGNAL_BYTES} bytes")
    return envelope


def open_signal(key: bytes, sender: str, receiver: str, envelope: str) -> tuple[int, bytes]:
    """(counter, plaintext) of an authentic envelope from ``sender`` to ``receiver``; else
    ``SignalRejectedError``. Replay and freshness checks are the caller's (``SignalSealer``)."""
    if not isinstance(envelope, str) or not envelope.startswith(ENVELOPE_PREFIX):
        raise SignalRejectedError("not a sealed signaling message")
    if len(envelope) > LINK_MAX_SIGNAL_BYTES:
        raise SignalRejectedError("signaling message is too large")
    try:
        raw = base64.urlsafe_b64decode(envelope[len(ENVELOPE_PREFIX):])
    except (binascii.Error, ValueError):
        raise SignalRejectedError("signaling message is not base64url") from None
    if len(raw) < _COUNTER.size + _NONCE_BYTES + 16:
        raise SignalRejectedError("signaling message is truncated")
    (counter,) = _COUNTER.unpack_from(raw)
    nonce = raw[_COUNTER.size:_COUNTER.size + _NONCE_BYTES]
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, raw[_COUNTER.size + _NONCE_BYTES:],
                                                  _aad(sender, receiver, counter))
    except InvalidTag:
        raise SignalRejectedError("signaling message failed authentication") from None
    return counter, plaintext


@dataclass(slots=True)
class SignalSealer:
    """Sealing and opening for one peer, with the counters that refuse replays and reordering."""

    pairing_key: bytes = field(repr=False)
    self_id: str
    peer_id: str
    clock: Callable[[], float] = time.time
    window_s: float = SIGNAL_WINDOW_S
    _key: bytes = field(init=False, repr=False)
    _sent: int = field(init=False, default=0)
    _received: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._key = derive_signal_key(self.pairing_key)

    def seal(self, plaintext: bytes) -> str:
        self._sent = max(self._sent + 1, int(self.clock() * 1_000_000))
        return seal_signal(self._key, self.self_id, self.peer_id, self._sent, plaintext)

    def open(self, envelope: str) -> bytes:
        counter, plaintext = open_signal(self._key, self.peer_id, self.self_id, envelope)
        if counter <= self._received:
            raise SignalRejectedError("signaling message replayed or out of order")
        if abs(counter / 1_000_000 - self.clock()) > self.window_s:
            raise SignalRejectedError("signaling message is outside the freshness window")
        self._received = counter
        return plaintext
