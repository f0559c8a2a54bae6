"""Signed requests: the ``dvai-sig-v1`` message, HMAC-SHA256 signatures, nonces, replay memory.

The wire contract (docs/security.md, "Signing spec")::

    message   = "dvai-sig-v1" LF nonce LF METHOD LF path-with-query LF sha256-hex(body)
    signature = hex(HMAC-SHA256(pairing key, message))          (64 characters)
    nonce     = <unix-ms> "." <random>                          (random: 8-64 of [A-Za-z0-9_-])

sent in four headers, all or none: ``X-DVAI-Peer-Device-Id``, ``X-DVAI-App-Id``,
``X-DVAI-Nonce``, ``X-DVAI-Signature``. The message does not cover the device or app id:
the (device id, app id) pair selects the key — each app on a device holds its own — so a
changed device or app id fails the signature, and one app's key never acts for another.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from yarl import URL

from ..common.clock import unix_ms
from ..common.errors import AuthenticationError
from ..constants import NONCE_CACHE_MAX, NONCE_MAX_CHARS, SIGNATURE_WINDOW_S, SIGNED_HEADER_MAX_CHARS

SIGNATURE_VERSION = "dvai-sig-v1"
HEADER_PEER_DEVICE_ID = "X-DVAI-Peer-Device-Id"
HEADER_APP_ID = "X-DVAI-App-Id"
HEADER_NONCE = "X-DVAI-Nonce"
HEADER_SIGNATURE = "X-DVAI-Signature"
SIGNED_HEADERS = (HEADER_PEER_DEVICE_ID, HEADER_APP_ID, HEADER_NONCE, HEADER_SIGNATURE)
ANONYMOUS = "anonymous"

_NONCE_RE = re.compile(r"([0-9]{1,15})\.([A-Za-z0-9_-]{8,64})")
_ID_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: safe in headers and logs
_HEX_SIGNATURE_RE = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who a request is attributed to: a verified peer and app, or ``anonymous``."""

    peer_device_id: str = ANONYMOUS
    app_id: str = ANONYMOUS
    signed: bool = False
    api_key: str | None = None
    """the id of the API key (``Authorization: Bearer``) the request was made with."""

    @property
    def authenticated(self) -> bool:
        """Signed by a paired device, or made with a valid API key."""
        return self.signed or self.api_key is not None


ANONYMOUS_ATTRIBUTION = Attribution()


class SigningCredential(Protocol):
    """What signing and verification need from a pairing (``node.pairing.Pairing`` is one).

    ``our_app_id`` is what we send when we sign with ``key`` (None: we may not call the peer
    with it); ``peer_app_id`` is what the peer must send (None: it may not call us with it).
    """

    @property
    def key(self) -> bytes: ...

    @property
    def our_app_id(self) -> str | None: ...

    @property
    def peer_app_id(self) -> str | None: ...


# --------------------------------------------------------------------------
# The message and its MAC


def compose_signed_message(nonce: str, method: str, path_with_query: str, body: bytes | str) -> bytes:
    """``dvai-sig-v1\\n<nonce>\\n<METHOD>\\n<path-with-query>\\n<sha256-hex(body)>`` as UTF-8 bytes.

    ``path_with_query`` is the request target exactly as sent on the wire (percent-encoding
    kept, ``?query`` included). A field containing CR or LF would make the message ambiguous
    and raises ``ValueError``.
    """
    for name, value in (("nonce", nonce), ("method", method), ("path_with_query", path_with_query)):
        if not isinstance(value, str) or not value or "\n" in value or "\r" in value:
            raise ValueError(f"{name} must be a non-empty string without line breaks")
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    digest = hashlib.sha256(data).hexdigest()
    return "\n".join((SIGNATURE_VERSION, nonce, method.upper(), path_with_query, digest)).encode("utf-8")


def sign_hmac(key: bytes, message: bytes) -> str:
    """Lower-case hex HMAC-SHA256 of ``message`` under ``key``."""
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify_hmac(key: bytes, message: bytes, signature_hex: str) -> bool:
    """True when ``signature_hex`` is the HMAC-SHA256 of ``message``; constant-time; malformed → False."""
    if not isinstance(signature_hex, str) or not _HEX_SIGNATURE_RE.fullmatch(signature_hex):
        return False
    expected = hmac.new(key, message, hashlib.sha256).digest()
    return hmac.compare_digest(expected, bytes.fromhex(signature_hex))


def new_nonce(now_ms: int | None = None) -> str:
    """``<unix-ms>.<random>`` with 128 random bits."""
    stamp = unix_ms() if now_ms is None else int(now_ms)
    return f"{stamp}.{secrets.token_urlsafe(16)}"


def parse_nonce_timestamp(nonce: str) -> int | None:
    """The ``<unix-ms>`` part of a well-formed nonce, else None."""
    if not isinstance(nonce, str) or len(nonce) > NONCE_MAX_CHARS:
        return None
    match = _NONCE_RE.fullmatch(nonce)
    return int(match.group(1)) if match else None


def path_with_query_of(url: str | URL) -> str:
    """The request target aiohttp's client sends for ``url``: what a signer must sign."""
    return URL(url).raw_path_qs


def sign_request_headers(
    key: bytes,
    device_id: str,
    app_id: str,
    method: str,
    path_with_query: str,
    body: bytes | str,
    now_ms: int | None = None,
) -> dict[str, str]:
    """The four ``X-DVAI-*`` headers for an outgoing request signed with ``key``."""
    nonce = new_nonce(now_ms)
    message = compose_signed_message(nonce, method, path_with_query, body)
    return {
        HEADER_PEER_DEVICE_ID: device_id,
        HEADER_APP_ID: app_id,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: sign_hmac(key, message),
    }


def sign_with_pairing(
    credential: SigningCredential,
    my_device_id: str,
    method: str,
    path_with_query: str,
    body: bytes | str,
    now_ms: int | None = None,
) -> dict[str, str]:
    """The four headers for a request *we* send over a pairing: the one signing path used by the
    forwarder, the capability check and anything else that calls a paired peer, whatever kind of
    pairing it is (LAN outbound, QR or static mutual). ``ValueError`` when the pairing does not
    let us call the peer."""
    if credential.our_app_id is None:
        raise ValueError("this pairing does not let us call the peer (it was issued to the peer)")
    return sign_request_headers(credential.key, my_device_id, credential.our_app_id, method,
                                path_with_query, body, now_ms)


# --------------------------------------------------------------------------
# Replay memory


NonceVerdict = Literal["fresh", "replayed", "below_floor"]


class NonceCache:
    """Nonces seen in the last ``window_s``, bounded to ``max_entries``.

    Entries are ordered by the nonce's own timestamp and dropped once older than the window
    (such a nonce is refused as stale anyway). When the cache is full the *oldest* entry is
    evicted and its timestamp becomes a floor: from then on any nonce at or below the floor
    that is not in the cache is refused. So a flood can never make the cache forget a nonce
    and then accept it again; the price is that, under a flood, the accepted window shrinks
    from the old end (a slow or clock-skewed peer gets 401 ``nonce_below_replay_floor`` and
    retries with a fresh nonce). Only verified requests are remembered, so only a paired peer
    can fill the cache at all.
    """

    def __init__(self, *, window_s: float = SIGNATURE_WINDOW_S, max_entries: int = NONCE_CACHE_MAX,
                 floor_ms: int | None = None) -> None:
        """``floor_ms``: refuse every nonce stamped at or before it. A node passes its start time,
        so a request captured before a restart (when this memory was empty) cannot be replayed
        after it (``NonceCache.for_process_start``)."""
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.window_ms = int(window_s * 1000)
        self.max_entries = max_entries
        self._heap: list[tuple[int, bytes]] = []
        self._seen: set[bytes] = set()
        self._floor_ms: int | None = floor_ms

    @classmethod
    def for_process_start(cls, *, window_s: float = SIGNATURE_WINDOW_S,
                          max_entries: int = NONCE_CACHE_MAX) -> NonceCache:
        """A cache for a node starting now: nonces stamped before this instant are refused.

        Nothing is persisted, so this is what makes a restart safe: every nonce the previous
        process could have accepted is older than this process. The price: for as long as a
        peer's clock lags ours, right after a start, its fresh nonces look pre-start and get
        401 ``nonce_below_replay_floor`` (its retry with a newer nonce passes once its clock
        passes our start time).
        """
        return cls(window_s=window_s, max_entries=max_entries, floor_ms=unix_ms())

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def floor_ms(self) -> int | None:
        """Highest timestamp evicted for lack of room (None while nothing was)."""
        return self._floor_ms

    def remember(self, peer_device_id: str, nonce: str, timestamp_ms: int, now_ms: int) -> NonceVerdict:
        """Record a verified nonce; say whether it is fresh, a replay, or too old to vouch for."""
        self._expire(now_ms)
        digest = hashlib.blake2b(f"{peer_device_id}\n{nonce}".encode(), digest_size=16).digest()
        if digest in self._seen:
            return "replayed"
        if self._floor_ms is not None and timestamp_ms <= self._floor_ms:
            return "below_floor"
        if len(self._seen) >= self.max_entries:
            if timestamp_ms < self._heap[0][0]:
                return "below_floor"  # it would be the oldest entry: evict it instead of a newer one
            evicted_ms, evicted = heapq.heappop(self._heap)
            self._seen.discard(evicted)
            self._floor_ms = evicted_ms if self._floor_ms is None else max(self._floor_ms, evicted_ms)
        heapq.heappush(self._heap, (timestamp_ms, digest))
        self._seen.add(digest)
        return "fresh"

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        while self._heap and self._heap[0][0] < horizon:
            _, digest = heapq.heappop(self._heap)
            self._seen.discard(digest)


# --------------------------------------------------------------------------
# Verification


def verify_signed_request(
    headers: Mapping[str, str],
    method: str,
    path_with_query: str,
    body: bytes,
    *,
    lookup_key: Callable[[str, str], SigningCredential | None],
    nonces: NonceCache,
    now_ms: int,
    device_known: Callable[[str], bool] | None = None,
) -> Attribution:
    """Attribute a request: anonymous when unsigned, the peer and app when validly signed.

    ``lookup_key(peer_device_id, app_id)`` returns the pairing whose key that app on that
    device may use to call us (``PairingStore.credential_for``), or None when unknown or
    revoked. ``device_known(peer_device_id)`` (optional) tells an app that is not paired on a
    paired device (``app_id_mismatch``) from an unknown device (``unknown_pairing``). Raises
    ``AuthenticationError`` (401) with a specific ``code`` for every other case.
    """
    values = _signed_header_values(headers)
    if not values:
        return ANONYMOUS_ATTRIBUTION
    missing = [name for name in SIGNED_HEADERS if name not in values]
    if missing:
        raise _auth(
            f"signed requests need all four X-DVAI-* headers or none (all four or none); missing: "
            f"{', '.join(missing)}",
            "incomplete_signature_headers",
        )
    device_id, app_id = values[HEADER_PEER_DEVICE_ID], values[HEADER_APP_ID]
    nonce, signature = values[HEADER_NONCE], values[HEADER_SIGNATURE]
    for name, value in ((HEADER_PEER_DEVICE_ID, device_id), (HEADER_APP_ID, app_id)):
        if len(value) > SIGNED_HEADER_MAX_CHARS or not _ID_RE.fullmatch(value):
            raise _auth(f"{name} must be 1-{SIGNED_HEADER_MAX_CHARS} printable ASCII characters",
                        "malformed_signature_header")
    timestamp_ms = parse_nonce_timestamp(nonce)
    if timestamp_ms is None:
        raise _auth("X-DVAI-Nonce must be '<unix-ms>.<random>' (random: 8-64 of A-Z a-z 0-9 _ -)",
                    "malformed_nonce")
    _check_window(timestamp_ms, now_ms, nonces.window_ms)
    credential = lookup_key(device_id, app_id)
    if credential is None:
        if device_known is not None and device_known(device_id):
            raise _auth(f"X-DVAI-App-Id names no app paired on device '{device_id}' (each app pairs with its "
                        "own key; unknown or revoked)", "app_id_mismatch")
        raise _auth(f"no active pairing for device '{device_id}' (unknown or revoked)", "unknown_pairing")
    if credential.peer_app_id is None:
        raise _auth(f"the pairing with device '{device_id}' does not let it call this node (it lets this "
                    "node call that device)", "unknown_pairing")
    if not hmac.compare_digest(credential.peer_app_id.encode(), app_id.encode()):
        raise _auth(f"X-DVAI-App-Id does not match the app id paired for device '{device_id}'",
                    "app_id_mismatch")
    message = compose_signed_message(nonce, method, path_with_query, body)
    if not verify_hmac(credential.key, message, signature):
        raise _auth("X-DVAI-Signature does not match the request (wrong key, or the method, path, "
                    "query, body or nonce was changed)", "bad_signature")
    verdict = nonces.remember(device_id, nonce, timestamp_ms, now_ms)
    if verdict == "replayed":
        raise _auth("X-DVAI-Nonce was already used (replay)", "nonce_replayed")
    if verdict == "below_floor":
        raise _auth("X-DVAI-Nonce is older than the replay cache can vouch for (signed before this node "
                    "started, or evicted under load); retry with a fresh nonce", "nonce_below_replay_floor")
    return Attribution(peer_device_id=device_id, app_id=app_id, signed=True)


def _signed_header_values(headers: Mapping[str, str]) -> dict[str, str]:
    """The X-DVAI-* signature headers present (case-insensitive); a repeated one is refused."""
    getall = getattr(headers, "getall", None)
    found: dict[str, str] = {}
    for name in SIGNED_HEADERS:
        if getall is not None:
            values = list(getall(name, []))
        else:
            lowered = name.lower()
            values = [v for k, v in headers.items() if k.lower() == lowered]
        if len(values) > 1:
            raise _auth(f"{name} appears more than once", "duplicate_signature_header")
        if values:
            found[name] = values[0]
    return found


def _check_window(timestamp_ms: int, now_ms: int, window_ms: int) -> None:
    if timestamp_ms < now_ms - window_ms:
        raise _auth(f"X-DVAI-Nonce timestamp is more than {window_ms // 1000} s old (stale nonce)",
                    "nonce_expired")
    if timestamp_ms > now_ms + window_ms:
        raise _auth(f"X-DVAI-Nonce timestamp is more than {window_ms // 1000} s in the future "
                    "(check the clock)", "nonce_from_future")


def _auth(message: str, code: str) -> AuthenticationError:
    return AuthenticationError(message, code=code)


