"""Pairing and audit endpoints of the mesh plane.

``/v1/dvai/handshake`` is public (it is how a peer asks to pair). Everything
else here is an admin endpoint: loopback callers (the ``dvai-node`` CLI) or a
pairing marked admin; the security middleware enforces that.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..common.errors import (
    ConflictError,
    DVAIError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    UpstreamError,
)
from ..context import CONTEXT, NodeContext
from ..pairing import PairingFailedError, handle_handshake, pair_with
from ..pairing.qr_service import QrPairingService, offer_to_json, result_to_json
from ..transport.rendezvous_client import PairingExpiredError, RendezvousError
from .jsonbody import is_encodable, read_json

routes = web.RouteTableDef()

ADMIN_PATHS = frozenset({
    "/v1/dvai/audit",
    "/v1/dvai/pairings",
    "/v1/dvai/pairings/",
    "/v1/dvai/pairing-requests",
    "/v1/dvai/pairing-requests/",
    "/v1/dvai/pair-qr",
    "/v1/dvai/pair-qr/",
    "/v1/dvai/pair-scan",
})


def _trust(request: web.Request) -> NodeContext:
    context = request.app[CONTEXT]
    if context.pairings is None or context.approver is None:
        raise ServiceUnavailableError("pairing is not available on this node")
    return context


@routes.post("/v1/dvai/handshake")
async def handshake(request: web.Request) -> web.Response:
    context = _trust(request)
    body = await read_json(request)
    assert context.approver is not None and context.pairings is not None
    result = await handle_handshake(body, remote=request.remote or "", approver=context.approver,
                                    store=context.pairings, node_device_id=context.identity.device_id)
    return web.json_response(result)


@routes.get("/v1/dvai/pairings")
async def list_pairings(request: web.Request) -> web.Response:
    context = _trust(request)
    assert context.pairings is not None
    return web.json_response({"object": "list", "data": [p.to_public_json() for p in context.pairings.list()]})


@routes.post("/v1/dvai/pairings")
async def pair(request: web.Request) -> web.Response:
    """Pair with a peer by URL or by a discovered device id: ``{"url": …}`` or ``{"deviceId": …}``."""
    context = _trust(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("expected a JSON object with 'url' or 'deviceId'")
    url = body.get("url")
    if url is None and isinstance(body.get("deviceId"), str):
        url = context.peer_base_url(body["deviceId"])
        if url is None:
            raise NotFoundError(f"no discovered peer has device id {body['deviceId']}", param="deviceId")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InvalidRequestError("'url' must be the peer's http(s) base URL", param="url")
    app_id = body.get("appId")
    if app_id is not None and not isinstance(app_id, str):
        raise InvalidRequestError("'appId' must be a string", param="appId")
    assert context.pairings is not None and context.http is not None
    pairing = await pair_with(context.http, url, identity=context.identity,
                              my_device_name=context.device_name, app_id=app_id, store=context.pairings)
    return web.json_response(pairing.to_public_json())


@routes.delete("/v1/dvai/pairings/{device_id}")
async def revoke(request: web.Request) -> web.Response:
    """Every pairing with the device, or with ``?appId=…`` only that app's inbound pairing."""
    context = _trust(request)
    assert context.pairings is not None
    device_id = request.match_info["device_id"]
    app_id = _app_id(request)
    removed = await context.pairings.revoke(device_id, app_id)  # NotFoundError (404) when there is none
    return web.json_response({"revoked": True, "peerDeviceId": device_id, "appId": app_id,
                              "pairings": [p.to_public_json() for p in removed]})


@routes.get("/v1/dvai/pairing-requests")
async def pending(request: web.Request) -> web.Response:
    context = _trust(request)
    assert context.approver is not None
    return web.json_response({"object": "list", "data": [r.to_json() for r in context.approver.pending()]})


@routes.post("/v1/dvai/pairing-requests/{device_id}/{verdict:approve|deny}")
async def decide_request(request: web.Request) -> web.Response:
    context = _trust(request)
    assert context.approver is not None
    device_id, verdict = request.match_info["device_id"], request.match_info["verdict"]
    settle = context.approver.approve if verdict == "approve" else context.approver.deny
    # 404 when nothing is pending for that device (and ?appId=…), 409 when several apps are
    settled = settle(device_id, _app_id(request))
    return web.json_response({"peerDeviceId": device_id, "appId": settled.app_id,
                              "approved": verdict == "approve"})


@routes.get("/v1/dvai/audit")
async def audit(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    if context.audit is None:
        raise ServiceUnavailableError("the audit log is disabled (audit.enabled = false)")
    query = request.query
    filters: dict[str, Any] = {
        "since": _int(query, "since"),
        "until": _int(query, "until"),
        "status": _int(query, "status"),
        "app_id": _text(query, "app_id") or _text(query, "appId") or _text(query, "app"),
        "peer": _text(query, "peer"),
        "limit": _limit(query),
    }
    rows = await context.audit.query(**filters)
    return web.json_response({"object": "list", "data": [row.to_json() for row in rows]})


def _app_id(request: web.Request) -> str | None:
    """``?appId=…``: absent → None (the whole device); present, it must name an app."""
    if "appId" not in request.query:
        return None
    app_id = _text(request.query, "appId")
    if app_id is None:
        raise InvalidRequestError("query parameter 'appId' must name an app (omit it for the whole device)",
                                  param="appId")
    return app_id


def _limit(query: Any) -> int:
    limit = _int(query, "limit")
    if limit is None:
        return 100
    if not 1 <= limit <= 10_000:
        raise InvalidRequestError("query parameter 'limit' must be from 1 to 10000", param="limit")
    return limit


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _int(query: Any, name: str) -> int | None:
    """An integer query parameter that fits SQLite's 64-bit INTEGER."""
    value = query.get(name)
    if value is None or value == "":
        return None
    error = InvalidRequestError(f"query parameter '{name}' must be an integer from {_INT64_MIN} to {_INT64_MAX}",
                                param=name)
    if len(value) > 20:
        raise error
    try:
        number = int(value)
    except ValueError:
        raise error from None
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise error
    return number


def _text(query: Any, name: str) -> str | None:
    value = query.get(name)
    if value is not None and not is_encodable(value):
        raise InvalidRequestError(f"query parameter '{name}' is not valid Unicode text", param=name)
    return value or None


# --- QR pairing through the rendezvous ---------------------------------------


def _qr(request: web.Request) -> QrPairingService:
    service = request.app[CONTEXT].qr
    if service is None:
        raise ServiceUnavailableError("QR pairing is not available on this node")
    return service


class PairingGoneError(DVAIError):
    status = 410
    error_type = "invalid_request_error"
    code = "pairing_expired"


def pairing_error(exc: PairingFailedError) -> DVAIError:
    """How a failed QR exchange is reported: never with the key, always with the reason."""
    if isinstance(exc, PairingExpiredError):
        return PairingGoneError(f"the pairing session expired: {exc}")
    if isinstance(exc, RendezvousError) and exc.status == 0:
        return UpstreamError(f"cannot reach the rendezvous: {exc}", code="rendezvous_unreachable")
    return ConflictError(f"pairing failed: {exc}", code="pairing_failed")


@routes.post("/v1/dvai/pair-qr")
async def pair_qr(request: web.Request) -> web.Response:
    service = _qr(request)
    offer, _ = await service.offer()
    url = request.app[CONTEXT].config.offload.rendezvous_url or ""
    body = await asyncio.to_thread(offer_to_json, offer, rendezvous_url=url)  # renders PNG and SVG
    return web.json_response(body)


@routes.get("/v1/dvai/pair-qr/{session_id}")
async def pair_qr_status(request: web.Request) -> web.Response:
    return web.json_response(_qr(request).status(request.match_info["session_id"]).to_json())


@routes.delete("/v1/dvai/pair-qr/{session_id}")
async def pair_qr_cancel(request: web.Request) -> web.Response:
    status = await _qr(request).cancel(request.match_info["session_id"])
    return web.json_response(status.to_json())


@routes.post("/v1/dvai/pair-scan")
async def pair_scan(request: web.Request) -> web.Response:
    service = _qr(request)
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("payload"), str):
        raise InvalidRequestError("expected {\"payload\": \"dvai://pair?...\"}", param="payload")
    try:
        result = await service.scan(body["payload"])
    except PairingFailedError as exc:
        raise pairing_error(exc) from exc
    return web.json_response(result_to_json(result))
