"""The LAN pairing handshake (``POST /v1/dvai/handshake``): the server side and the client.

Request (the reference's v3.1 shape)::

    {"peerDeviceId": "phone-pixel-9", "peerDeviceName": "Pixel 9",
     "appId": "com.acme.chat",            # optional; falls back to peerDeviceId
     "via": "lan-handshake"}              # optional; only "lan-handshake" is accepted here

Response::

    {"paired": true, "pairedAt": 1778184673778, "via": "lan-handshake",
     "pairingKey": "<base64url, 256 bits>", "peerDeviceId": "phone-pixel-9"}

The key travels back over the LAN in the clear unless the node is behind TLS: that is the
reference's LAN trust model (docs/security.md). QR pairing through a rendezvous never uses it.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp

from ..constants import MESH_PATH, PAIRING_CLIENT_TIMEOUT_S, PAIRING_FIELD_MAX_CHARS, PAIRING_KEY_BYTES
from ..errors import (
    DVAIError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    UpstreamError,
)
from .approval import PairingApprover, PairingRequest
from .pairing import Pairing, PairingStore, decode_key, encode_key

HANDSHAKE_PATH = f"{MESH_PATH}/handshake"
HEALTH_PATH = f"{MESH_PATH}/health"
LAN_HANDSHAKE: Final = "lan-handshake"

_ID_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: used in headers later
_DENIAL_MESSAGES = {
    "pairing_denied": "this node does not accept pairing requests (pairing_policy = deny)",
    "not_in_allowlist": "this device is not in the node's pairing allowlist",
    "denied_by_operator": "the node's operator denied the pairing request",
    "pairing_timed_out": "the pairing request was not approved in time",
    "denied_by_hook": "the pairing request was denied",
    "pairing_hook_failed": "the pairing request was denied",
}


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_handshake_body(body: object, *, remote: str, now_ms: int) -> PairingRequest:
    """Validate a handshake body; ``InvalidRequestError`` (400) names the bad field."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("the handshake body must be a JSON object")
    device_id = _field(body, "peerDeviceId", required=True, identifier=True)
    assert device_id is not None
    name = _field(body, "peerDeviceName", required=True, identifier=False)
    app_id = _field(body, "appId", required=False, identifier=True) or device_id
    via = body.get("via", LAN_HANDSHAKE)
    if via != LAN_HANDSHAKE:
        raise InvalidRequestError(f"'via' must be '{LAN_HANDSHAKE}' on this endpoint", param="via")
    return PairingRequest(peer_device_id=device_id, peer_device_name=name or device_id, app_id=app_id,
                          via=LAN_HANDSHAKE, remote=remote, received_at=now_ms)


async def handle_handshake(
    body: object,
    *,
    remote: str,
    approver: PairingApprover,
    store: PairingStore,
    now: Callable[[], int] = _wall_clock_ms,
) -> dict[str, Any]:
    """Run one handshake: rate limit, validate, decide, store an inbound pairing, answer.

    Raises ``InvalidRequestError`` (400), ``PermissionDeniedError`` (403, ``code`` says why)
    or ``RateLimitedError`` (429 with ``Retry-After``).
    """
    approver.check_rate(f"address:{remote}")
    request = parse_handshake_body(body, remote=remote, now_ms=now())
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
        app_id=request.app_id,
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
    }


async def pair_with(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    my_device_id: str,
    my_device_name: str,
    app_id: str | None = None,
    store: PairingStore,
    now: Callable[[], int] = _wall_clock_ms,
    timeout_s: float = PAIRING_CLIENT_TIMEOUT_S,
) -> Pairing:
    """Ask the node at ``base_url`` to pair with us; store and return the outbound pairing.

    The peer's device id comes from its ``GET /v1/dvai/health`` (``deviceId``). May wait up
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
    bound_app_id = app_id or my_device_id
    request = {"peerDeviceId": my_device_id, "peerDeviceName": my_device_name,
               "appId": bound_app_id, "via": LAN_HANDSHAKE}
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
        app_id=bound_app_id,
        key=key,
        via=LAN_HANDSHAKE,
        paired_at=paired_at if isinstance(paired_at, int) and not isinstance(paired_at, bool) else now(),
        role="outbound",
        base_url=base + "/v1",
    )
    return await store.add(pairing)


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
