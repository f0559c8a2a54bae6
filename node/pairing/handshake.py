"""The LAN pairing handshake (``POST /v1/dvai/handshake``): the server side and the client.

Request (the reference's v3.1 shape)::

    {"peerDeviceId": "phone-pixel-9", "peerDeviceName": "Pixel 9",
     "appId": "com.acme.chat",            # optional; falls back to peerDeviceId
     "via": "lan-handshake",              # optional; only "lan-handshake" is accepted here
     "publicKey": "<base64url, 32 bytes>", # optional (our extension, all three or none): the
     "proofTimestamp": 1778184673000,      #   caller's raw Ed25519 public key, unix ms, and the
     "proof": "<base64url, 64 bytes>"}     #   signature over handshake_proof_message(...)

The proof shows the caller holds the key its ``peerDeviceId`` is derived from. A present proof
must verify (else 401); the ``allowlist`` policy requires one; ``prompt`` shows whether the id
was proven. Signed message (device ids are printable ASCII without spaces, so ``\n`` is safe)::

    b"dvai-handshake-v1" \n <caller's device id> \n <this node's device id> \n <proofTimestamp, decimal>

Response::

    {"paired": true, "pairedAt": 1778184673778, "via": "lan-handshake",
     "pairingKey": "<base64url, 256 bits>", "peerDeviceId": "phone-pixel-9",
     "appId": "com.acme.chat"}            # our extension: the app the key is bound to

Each (device, app) pair is its own pairing: another app on the same device runs its own
handshake, is approved on its own and gets its own key; a repeated handshake for the same app
replaces that app's key only.

The key travels back over the LAN in the clear unless the node is behind TLS: that is the
reference's LAN trust model (docs/security.md). QR pairing through a rendezvous never uses it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import aiohttp

from ..common.b64 import b64url_decode, b64url_encode
from ..common.clock import unix_ms
from ..common.device_ids import device_id_from_public_key, verify_device_signature
from ..common.errors import (
    AuthenticationError,
    DVAIError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    UpstreamError,
)
from ..common.messages import handshake_proof_message
from ..constants import (
    B64_FIELD_MAX_CHARS,
    MESH_PATH,
    PAIRING_CLIENT_TIMEOUT_S,
    PAIRING_FIELD_MAX_CHARS,
    PAIRING_KEY_BYTES,
    SIGNATURE_WINDOW_S,
)
from .approval import PairingApprover, PairingRequest
from .store import Pairing, PairingStore, decode_key, encode_key

HANDSHAKE_PATH = f"{MESH_PATH}/handshake"
HEALTH_PATH = f"{MESH_PATH}/health"
LAN_HANDSHAKE: Final = "lan-handshake"
PROOF_FIELDS: Final = ("publicKey", "proofTimestamp", "proof")

_ID_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: used in headers later
_DENIAL_MESSAGES = {
    "pairing_denied": "this node does not accept pairing requests (pairing_policy = deny)",
    "app_pairing_denied": "this node does not pair this app ([[security.app_pairing]] policy = deny)",
    "not_in_allowlist": "this device is not in the node's pairing allowlist",
    "device_proof_required": "this node pairs allowlisted devices only when the client proves its device id: "
                             "send publicKey, proofTimestamp and proof (docs/security.md)",
    "denied_by_operator": "the node's operator denied the pairing request",
    "pairing_timed_out": "the pairing request was not approved in time",
    "denied_by_hook": "the pairing request was denied",
    "pairing_hook_failed": "the pairing request was denied",
}


class DeviceSigner(Protocol):
    """What the handshake client needs of this device; ``DeviceIdentity`` is one."""

    @property
    def device_id(self) -> str: ...

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


def make_handshake_proof(signer: DeviceSigner, target_device_id: str, timestamp_ms: int) -> dict[str, Any]:
    """The ``publicKey``/``proofTimestamp``/``proof`` fields to add to a handshake body."""
    message = handshake_proof_message(signer.device_id, target_device_id, timestamp_ms)
    return {"publicKey": b64url_encode(signer.public_key), "proofTimestamp": timestamp_ms,
            "proof": b64url_encode(signer.sign(message))}


def check_handshake_proof(body: Mapping[str, Any], *, device_id: str, node_device_id: str, now_ms: int) -> bool:
    """False when ``body`` carries no proof, True when its proof verifies; raises otherwise.

    ``InvalidRequestError`` (400) for an incomplete set or a wrong JSON type; ``AuthenticationError``
    (401, ``device_proof_invalid`` / ``device_proof_expired``) for a proof that does not verify.
    """
    present = [name for name in PROOF_FIELDS if body.get(name) is not None]
    if not present:
        return False
    missing = [name for name in PROOF_FIELDS if name not in present]
    if missing:
        raise InvalidRequestError(f"'{missing[0]}' is required: a device proof is publicKey, proofTimestamp "
                                  "and proof together", param=missing[0])
    timestamp = body["proofTimestamp"]
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise InvalidRequestError("'proofTimestamp' must be an integer (unix ms)", param="proofTimestamp")
    public_key = _proof_bytes(body, "publicKey", 32)
    signature = _proof_bytes(body, "proof", 64)
    if abs(now_ms - timestamp) > SIGNATURE_WINDOW_S * 1000:
        raise AuthenticationError(f"'proofTimestamp' is more than {SIGNATURE_WINDOW_S} s away from this node's "
                                  "clock; check both clocks", param="proofTimestamp", code="device_proof_expired")
    if device_id_from_public_key(public_key) != device_id:
        raise AuthenticationError("'publicKey' is not the key 'peerDeviceId' is derived from",
                                  param="publicKey", code="device_proof_invalid")
    message = handshake_proof_message(device_id, node_device_id, timestamp)
    if not verify_device_signature(device_id, public_key, signature, message):
        raise AuthenticationError("'proof' does not verify: it must sign this node's device id with "
                                  "peerDeviceId's key", param="proof", code="device_proof_invalid")
    return True


def parse_handshake_body(body: object, *, remote: str, now_ms: int, node_device_id: str) -> PairingRequest:
    """Validate a handshake body and its optional device proof (``check_handshake_proof``).

    ``InvalidRequestError`` (400) names the bad field; a proof that does not verify is 401.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequestError("the handshake body must be a JSON object")
    device_id = _field(body, "peerDeviceId", required=True, identifier=True)
    assert device_id is not None
    name = _field(body, "peerDeviceName", required=True, identifier=False)
    app_id = _field(body, "appId", required=False, identifier=True) or device_id
    via = body.get("via", LAN_HANDSHAKE)
    if via != LAN_HANDSHAKE:
        raise InvalidRequestError(f"'via' must be '{LAN_HANDSHAKE}' on this endpoint", param="via")
    proven = check_handshake_proof(body, device_id=device_id, node_device_id=node_device_id, now_ms=now_ms)
    return PairingRequest(peer_device_id=device_id, peer_device_name=name or device_id, app_id=app_id,
                          via=LAN_HANDSHAKE, remote=remote, received_at=now_ms, proven=proven)


async def handle_handshake(
    body: object,
    *,
    remote: str,
    approver: PairingApprover,
    store: PairingStore,
    node_device_id: str,
    now: Callable[[], int] = unix_ms,
) -> dict[str, Any]:
    """Run one handshake: rate limit, validate, decide, store an inbound pairing, answer.

    ``node_device_id`` is this node's own device id: a caller's proof must name it.
    Raises ``InvalidRequestError`` (400), ``AuthenticationError`` (401, a proof that does not
    verify), ``PermissionDeniedError`` (403, ``code`` says why) or ``RateLimitedError`` (429).
    """
    approver.check_rate(f"address:{remote}")
    now_ms = now()
    request = parse_handshake_body(body, remote=remote, now_ms=now_ms, node_device_id=node_device_id)
    if request.proven:
        assert isinstance(body, dict)
        signature = _proof_bytes(body, "proof", 64).hex()  # decoded: padding cannot dodge the check
        verdict = approver.seen_proofs.remember(request.peer_device_id, signature,
                                                int(body["proofTimestamp"]), now_ms)
        if verdict != "fresh":
            raise AuthenticationError("this device proof was already used; sign a fresh one",
                                      param="proof", code="device_proof_replayed")
    approver.check_rate(f"device:{request.peer_device_id}")
    decision = await approver.decide(request)
    if not decision.approved:
        message = _DENIAL_MESSAGES.get(decision.reason, "the pairing request was denied")
        raise PermissionDeniedError(message, code=decision.reason)
    key = decision.pairing_key or secrets.token_bytes(PAIRING_KEY_BYTES)
    paired_at = now()
    await store.add(Pairing(
        peer_device_id=request.peer_device_id,
        peer_device_name=request.peer_device_name,
        peer_app_id=request.app_id,
        key=key,
        via=LAN_HANDSHAKE,
        paired_at=paired_at,
        role="inbound",
    ))
    return {
        "paired": True,
        "pairedAt": paired_at,
        "via": LAN_HANDSHAKE,
        "pairingKey": encode_key(key),
        "peerDeviceId": request.peer_device_id,
        "appId": request.app_id,
    }


class _ProofTimestamps:
    """Hands each outgoing handshake proof its own ``proofTimestamp`` (unix ms), never behind the
    clock: a proof does not cover ``appId`` and a node accepts each proof once, so two apps of one
    device pairing in the same millisecond would send the same proof and the second would be
    refused as a replay (``device_proof_replayed``)."""

    def __init__(self) -> None:
        self._last_ms = 0

    def next(self, now_ms: int) -> int:
        self._last_ms = max(now_ms, self._last_ms + 1)
        return self._last_ms


_PROOF_TIMESTAMPS = _ProofTimestamps()


async def pair_with(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    identity: DeviceSigner,
    my_device_name: str,
    app_id: str | None = None,
    store: PairingStore,
    now: Callable[[], int] = unix_ms,
    timeout_s: float = PAIRING_CLIENT_TIMEOUT_S,
) -> Pairing:
    """Ask the node at ``base_url`` to pair with us; store and return the outbound pairing.

    The peer's device id comes from its ``GET /v1/dvai/health`` (``deviceId``); the request
    carries a proof, signed with ``identity``, bound to that id. May wait up
    to ``timeout_s`` while the peer's operator decides. Raises the peer's refusal as
    ``PermissionDeniedError`` / ``RateLimitedError`` / ``InvalidRequestError``, anything else
    as ``UpstreamError``.
    """
    # Accept the node root or its OpenAI base URL (``…/v1``, the Peer type's baseUrl).
    base = base_url.rstrip("/").removesuffix("/v1")
    # a peer still loading its model answers 503 with the same body; its deviceId is all we need
    health = await _request_json(session, "GET", base + HEALTH_PATH, None, 10.0, ok_statuses=(503,))
    peer_id = health.get("deviceId")
    if not isinstance(peer_id, str) or not _ID_RE.fullmatch(peer_id) or len(peer_id) > PAIRING_FIELD_MAX_CHARS:
        raise UpstreamError(f"{base}{HEALTH_PATH} did not report a usable deviceId")
    peer_name = health.get("deviceName")
    my_device_id = identity.device_id
    bound_app_id = app_id or my_device_id
    request = {"peerDeviceId": my_device_id, "peerDeviceName": my_device_name,
               "appId": bound_app_id, "via": LAN_HANDSHAKE,
               **make_handshake_proof(identity, peer_id, _PROOF_TIMESTAMPS.next(now()))}
    answer = await _request_json(session, "POST", base + HANDSHAKE_PATH, request, timeout_s)
    if answer.get("paired") is not True or answer.get("peerDeviceId") != my_device_id:
        raise UpstreamError(f"{base} answered the handshake without pairing this device")
    try:
        key = decode_key(answer.get("pairingKey"))  # type: ignore[arg-type]
    except ValueError as exc:
        raise UpstreamError(f"{base} sent an unusable pairingKey: {exc}") from exc
    paired_at = answer.get("pairedAt")
    pairing = Pairing(
        peer_device_id=peer_id,
        peer_device_name=peer_name if isinstance(peer_name, str) and peer_name else peer_id,
        our_app_id=bound_app_id,
        key=key,
        via=LAN_HANDSHAKE,
        paired_at=paired_at if isinstance(paired_at, int) and not isinstance(paired_at, bool) else now(),
        role="outbound",
        base_url=base + "/v1",
    )
    return await store.add(pairing)


def _proof_bytes(body: Mapping[str, Any], name: str, size: int) -> bytes:
    value = body[name]
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{name}' must be a base64url string", param=name)
    raw = None
    if len(value) <= B64_FIELD_MAX_CHARS:  # padding tolerated (Java's encoder adds it): node/common/b64.py
        try:
            raw = b64url_decode(value)
        except ValueError:
            raw = None
    if raw is None or len(raw) != size:
        raise AuthenticationError(f"'{name}' must be {size} bytes in base64url", param=name,
                                  code="device_proof_invalid")
    return raw


def _field(body: Mapping[str, Any], name: str, *, required: bool, identifier: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequestError(f"'{name}' is required", param=name)
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"'{name}' must be a non-empty string", param=name)
    if len(value) > PAIRING_FIELD_MAX_CHARS:
        raise InvalidRequestError(f"'{name}' is longer than {PAIRING_FIELD_MAX_CHARS} characters", param=name)
    if identifier and not _ID_RE.fullmatch(value):
        raise InvalidRequestError(f"'{name}' must be printable ASCII without spaces", param=name)
    if not identifier and not value.isprintable():
        raise InvalidRequestError(f"'{name}' must not contain control characters", param=name)
    return value


async def _request_json(session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None,
                        timeout_s: float, *, ok_statuses: tuple[int, ...] = ()) -> dict[str, Any]:
    try:
        async with session.request(method, url, json=body,
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            try:
                payload = await response.json(content_type=None)
            except ValueError:
                payload = None
            if response.status >= 400 and response.status not in ok_statuses:
                raise _peer_error(url, response.status, payload, response.headers.get("Retry-After"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamError(f"could not reach {url}: {exc or type(exc).__name__}") from exc
    if not isinstance(payload, dict):
        raise UpstreamError(f"{url} did not answer with a JSON object")
    return payload


def _peer_error(url: str, status: int, payload: object, retry_after: str | None) -> DVAIError:
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    text = f"{url}: {message if isinstance(message, str) else f'HTTP {status}'}"
    code = code if isinstance(code, str) else None
    if status == 401:
        return AuthenticationError(text, code=code)
    if status == 403:
        return PermissionDeniedError(text, code=code)
    if status == 429:
        try:
            wait = float(retry_after) if retry_after else 1.0
        except ValueError:
            wait = 1.0
        return RateLimitedError(text, retry_after=wait, code=code)
    if status == 400:
        return InvalidRequestError(text, code=code)
    return UpstreamError(text)
