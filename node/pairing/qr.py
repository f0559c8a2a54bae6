"""QR pairing, the pure part: the ``dvai://pair`` payload, key agreement, key confirmation.

No I/O here (``node.transport.rendezvous_client`` talks to the rendezvous).
The protocol, byte for byte, with known-answer values, is in
``docs/pairing-protocol.md``. In short::

    shared   = X25519(own ephemeral private, peer ephemeral public)   (all-zero → refuse)
    info     = lp("dvai-pair-v1") lp(session id) lp(A) lp(B) lp(initiator id) lp(scanner id)
               (lp(x) = 2-byte big-endian length, then x; A = initiator's key, B = scanner's)
    okm      = HKDF-SHA256(salt = one-time secret, ikm = shared, info, 72 bytes)
    pairing key = okm[0:32], confirmation key = okm[32:64],
    short code  = int(okm[64:72], big-endian) mod 10^6, six digits

Each side then sends a key-confirmation message: its device name, its
long-term Ed25519 public key, an Ed25519 signature over the transcript hash
(proving its device id), and an HMAC under the confirmation key with a label
distinct per direction. The scanner closes with a ``finish`` MAC.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import segno
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..common.b64 import b64url_decode, b64url_encode
from ..common.clock import unix_ms
from ..common.device_ids import is_valid_device_id, verify_device_signature
from ..constants import (
    QR_MAX_B64_FIELD_CHARS,
    QR_MAX_CONFIRMATION_CHARS,
    QR_MAX_DEVICE_NAME_BYTES,
    QR_MAX_SECRET_BYTES,
    QR_MAX_URI_CHARS,
    QR_MIN_SECRET_BYTES,
)
from ..identity import DeviceIdentity

PAIRING_VERSION = 1
PROTOCOL_LABEL = b"dvai-pair-v1"
URI_PREFIX = "dvai://pair?"
SECRET_BYTES = 32
"""bytes of the one-time secret put in the QR (256 bits; at least 16 are accepted)."""
OKM_BYTES = 72
SHORT_CODE_DIGITS = 6

_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class PairingFailedError(Exception):
    """The exchange did not prove that both sides hold the same key: nothing may be stored."""


class Role(StrEnum):
    INITIATOR = "initiator"
    SCANNER = "scanner"


@dataclass(frozen=True, slots=True)
class QrPayload:
    """What the QR code carries. ``secret`` never reaches the rendezvous."""

    rendezvous_url: str
    session_id: str
    initiator_public_key: bytes
    initiator_device_id: str
    secret: bytes = field(repr=False)
    version: int = PAIRING_VERSION

    def to_uri(self) -> str:
        return URI_PREFIX + "&".join((
            f"v={self.version}",
            f"r={quote(self.rendezvous_url, safe='')}",
            f"s={self.session_id}",
            f"k={b64url_encode(self.initiator_public_key)}",
            f"d={self.initiator_device_id}",
            f"t={b64url_encode(self.secret)}",
        ))


@dataclass(frozen=True, slots=True)
class PairingTranscript:
    """The public values both sides bind into the key, in this fixed order."""

    session_id: str
    initiator_public_key: bytes
    scanner_public_key: bytes
    initiator_device_id: str
    scanner_device_id: str

    def info(self) -> bytes:
        return length_prefixed(
            PROTOCOL_LABEL,
            self.session_id.encode(),
            self.initiator_public_key,
            self.scanner_public_key,
            self.initiator_device_id.encode(),
            self.scanner_device_id.encode(),
        )

    def digest(self) -> bytes:
        return hashlib.sha256(self.info()).digest()


@dataclass(frozen=True, slots=True)
class SessionKeys:
    pairing_key: bytes = field(repr=False)
    confirmation_key: bytes = field(repr=False)
    short_code: str


@dataclass(frozen=True, slots=True)
class PeerConfirmation:
    """What a verified confirmation message tells about the other side."""

    device_id: str
    device_name: str
    identity_public_key: bytes


@dataclass(frozen=True, slots=True)
class PairingResult:
    """A finished pairing, to be stored like a LAN pairing (``via = "rendezvous"``)."""

    peer_device_id: str
    peer_device_name: str
    pairing_key: bytes = field(repr=False)
    short_code: str
    via: str = "rendezvous"
    paired_at: int = 0
    """unix milliseconds."""

    @property
    def pairing_key_b64(self) -> str:
        """The key as the reference's handshake carries it: base64url, no padding."""
        return b64url_encode(self.pairing_key)


# --------------------------------------------------------------------------
# The payload


def new_secret(random_bytes: bytes) -> bytes:
    if not QR_MIN_SECRET_BYTES <= len(random_bytes) <= QR_MAX_SECRET_BYTES:
        raise ValueError(f"the one-time secret must be {QR_MIN_SECRET_BYTES}-{QR_MAX_SECRET_BYTES} bytes")
    return random_bytes


def parse_pairing_uri(text: str) -> QrPayload:
    """Parse and check a ``dvai://pair?...`` URI; ``ValueError`` says what is wrong."""
    if not isinstance(text, str) or len(text) > QR_MAX_URI_CHARS:
        raise ValueError("not a pairing payload (not a string, or too long)")
    text = text.strip()
    if not text.startswith(URI_PREFIX):
        raise ValueError("not a pairing payload: it must start with dvai://pair?")
    params = parse_qs(text[len(URI_PREFIX):], keep_blank_values=True, strict_parsing=False)
    values: dict[str, str] = {}
    for name in ("v", "r", "s", "k", "d", "t"):
        found = params.get(name)
        if not found or len(found) != 1:
            raise ValueError(f"pairing payload: '{name}' must appear exactly once")
        values[name] = found[0]
    if values["v"] != str(PAIRING_VERSION):
        raise ValueError(f"pairing payload version {values['v']!r} is not supported (this node speaks 1)")
    url = urlsplit(values["r"])
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise ValueError("pairing payload: 'r' must be the rendezvous http(s) URL")
    if not _SESSION_ID_RE.match(values["s"]):
        raise ValueError("pairing payload: 's' is not a session id")
    if not is_valid_device_id(values["d"]):
        raise ValueError("pairing payload: 'd' is not a device id")
    key = decode_b64_field(values["k"], "k")
    if len(key) != 32:
        raise ValueError("pairing payload: 'k' must be a 32-byte X25519 public key")
    secret = decode_b64_field(values["t"], "t")
    if not QR_MIN_SECRET_BYTES <= len(secret) <= QR_MAX_SECRET_BYTES:
        raise ValueError(f"pairing payload: 't' must be {QR_MIN_SECRET_BYTES}-{QR_MAX_SECRET_BYTES} bytes")
    return QrPayload(values["r"].rstrip("/"), values["s"], key, values["d"], secret)


# --------------------------------------------------------------------------
# Key agreement


def generate_ephemeral_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_shared_secret(private_key: X25519PrivateKey, peer_public_key: bytes) -> bytes:
    """X25519 (RFC 7748); a low-order peer key (all-zero result) is refused."""
    if len(peer_public_key) != 32:
        raise PairingFailedError("the peer's X25519 public key is not 32 bytes")
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError as exc:  # OpenSSL refuses an all-zero result itself
        raise PairingFailedError("the peer's X25519 public key gives an all-zero shared secret") from exc
    if not any(shared):
        raise PairingFailedError("the peer's X25519 public key gives an all-zero shared secret")
    return shared


def derive_session_keys(shared_secret: bytes, secret: bytes, transcript: PairingTranscript) -> SessionKeys:
    """HKDF-SHA256(salt = one-time secret, ikm = X25519 output, info = transcript) → keys and short code."""
    if not any(shared_secret):
        raise PairingFailedError("all-zero shared secret")
    okm = HKDF(algorithm=hashes.SHA256(), length=OKM_BYTES, salt=secret, info=transcript.info()).derive(
        shared_secret
    )
    code = int.from_bytes(okm[64:72], "big") % 10**SHORT_CODE_DIGITS
    return SessionKeys(okm[0:32], okm[32:64], f"{code:0{SHORT_CODE_DIGITS}d}")


# --------------------------------------------------------------------------
# Key confirmation


def build_confirmation(
    keys: SessionKeys, transcript: PairingTranscript, role: Role, identity: DeviceIdentity, device_name: str
) -> str:
    """The opaque message one side posts to the rendezvous after deriving the keys."""
    name = _check_name(device_name)
    signature = identity.sign(_identity_statement(role, transcript))
    mac = _confirmation_mac(keys, transcript, role, name, identity.public_key, signature)
    return json.dumps(
        {
            "v": PAIRING_VERSION,
            "device_name": name,
            "identity_key": b64url_encode(identity.public_key),
            "signature": b64url_encode(signature),
            "mac": b64url_encode(mac),
        },
        separators=(",", ":"),
    )


def verify_confirmation(
    keys: SessionKeys, transcript: PairingTranscript, role: Role, message: str
) -> PeerConfirmation:
    """Check the ``role`` side's confirmation: MAC first, then that its key owns its device id."""
    fields = _parse_message(message, ("v", "device_name", "identity_key", "signature", "mac"))
    name = fields["device_name"]
    try:
        name = _check_name(name)
    except ValueError as exc:
        raise PairingFailedError(f"key confirmation failed: {exc}") from exc
    identity_key = b64decode_or_fail(fields["identity_key"])
    signature = b64decode_or_fail(fields["signature"])
    expected = _confirmation_mac(keys, transcript, role, name, identity_key, signature)
    if not hmac.compare_digest(expected, b64decode_or_fail(fields["mac"])):
        raise PairingFailedError(f"key confirmation failed: the {role.value}'s MAC does not match")
    device_id = transcript.scanner_device_id if role is Role.SCANNER else transcript.initiator_device_id
    if not verify_device_signature(device_id, identity_key, signature, _identity_statement(role, transcript)):
        raise PairingFailedError(f"key confirmation failed: the {role.value} did not prove device id {device_id}")
    return PeerConfirmation(device_id, name, identity_key)


def build_finish(keys: SessionKeys, transcript: PairingTranscript) -> str:
    return json.dumps({"v": PAIRING_VERSION, "mac": b64url_encode(_finish_mac(keys, transcript))}, separators=(",", ":"))


def verify_finish(keys: SessionKeys, transcript: PairingTranscript, message: str) -> None:
    fields = _parse_message(message, ("v", "mac"))
    if not hmac.compare_digest(_finish_mac(keys, transcript), b64decode_or_fail(fields["mac"])):
        raise PairingFailedError("key confirmation failed: the scanner's finish MAC does not match")


def make_result(confirmation: PeerConfirmation, keys: SessionKeys, now: float | None = None) -> PairingResult:
    """The pairing's outcome; ``now`` is unix seconds (the rendezvous client's clock), default the wall clock."""
    return PairingResult(
        peer_device_id=confirmation.device_id,
        peer_device_name=confirmation.device_name,
        pairing_key=keys.pairing_key,
        short_code=keys.short_code,
        paired_at=unix_ms() if now is None else int(now * 1000),
    )


# --------------------------------------------------------------------------
# Helpers


def length_prefixed(*fields: bytes) -> bytes:
    out = bytearray()
    for item in fields:
        if len(item) > 0xFFFF:
            raise ValueError("field too long for a 2-byte length prefix")
        out += len(item).to_bytes(2, "big") + item
    return bytes(out)


def decode_b64_field(text: str, name: str) -> bytes:
    """A base64url field under the one decoding rule (``node/common/b64.py``); errors name it."""
    try:
        return b64url_decode(text)
    except ValueError as exc:
        raise ValueError(f"'{name}' is {exc}") from exc


def b64decode_or_fail(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > QR_MAX_B64_FIELD_CHARS:
        raise PairingFailedError("key confirmation failed: malformed field")
    try:
        return decode_b64_field(value, "field")
    except ValueError as exc:
        raise PairingFailedError(f"key confirmation failed: {exc}") from exc


def _identity_statement(role: Role, transcript: PairingTranscript) -> bytes:
    return length_prefixed(PROTOCOL_LABEL + b" identity " + role.value.encode(), transcript.digest())


def _confirmation_mac(
    keys: SessionKeys,
    transcript: PairingTranscript,
    role: Role,
    name: str,
    identity_key: bytes,
    signature: bytes,
) -> bytes:
    data = length_prefixed(
        PROTOCOL_LABEL + b" confirm " + role.value.encode(),
        transcript.digest(),
        name.encode(),
        identity_key,
        signature,
    )
    return hmac.new(keys.confirmation_key, data, hashlib.sha256).digest()


def _finish_mac(keys: SessionKeys, transcript: PairingTranscript) -> bytes:
    data = length_prefixed(PROTOCOL_LABEL + b" finish", transcript.digest())
    return hmac.new(keys.confirmation_key, data, hashlib.sha256).digest()


def _parse_message(message: str, names: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(message, str) or len(message) > QR_MAX_CONFIRMATION_CHARS:
        raise PairingFailedError("key confirmation failed: message missing or too long")
    try:
        fields = json.loads(message)
    except ValueError as exc:
        raise PairingFailedError("key confirmation failed: message is not JSON") from exc
    if not isinstance(fields, dict) or any(name not in fields for name in names):
        raise PairingFailedError("key confirmation failed: message lacks fields")
    if fields["v"] != PAIRING_VERSION:
        raise PairingFailedError(f"key confirmation failed: unsupported version {fields['v']!r}")
    return fields


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a device name must be a non-empty string")
    if len(name.encode()) > QR_MAX_DEVICE_NAME_BYTES:
        raise ValueError(f"a device name must be at most {QR_MAX_DEVICE_NAME_BYTES} UTF-8 bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("a device name must not contain control characters")
    return name


# --------------------------------------------------------------------------
# Rendering (segno)


def render_qr_text(uri: str) -> str:
    """The QR as Unicode half blocks for a terminal (dark modules drawn light-on-dark)."""
    out = io.StringIO()
    segno.make(uri, error="m", micro=False).terminal(out=out, compact=True)
    return out.getvalue()


def render_qr_png(uri: str, *, scale: int = 6) -> bytes:
    out = io.BytesIO()
    segno.make(uri, error="m", micro=False).save(out, kind="png", scale=scale, border=4)
    return out.getvalue()


def render_qr_svg(uri: str, *, scale: int = 6) -> str:
    out = io.BytesIO()
    segno.make(uri, error="m", micro=False).save(out, kind="svg", scale=scale, border=4, xmldecl=False)
    return out.getvalue().decode()
