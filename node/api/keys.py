"""Hub administration (loopback-only): API keys (mint, list, revoke), per-app usage, the apps
and devices that use the node, and the quota rules in force."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from aiohttp import web

from ..common.clock import unix_ms
from ..common.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError
from ..context import CONTEXT
from ..hub.directory import apps_json, devices_json, quota_rules_json
from ..hub.keys import ApiKeyStore, parse_scopes
from .jsonbody import read_json

routes = web.RouteTableDef()

ADMIN_PATHS = frozenset({"/v1/dvai/keys", "/v1/dvai/keys/", "/v1/dvai/usage", "/v1/dvai/apps", "/v1/dvai/devices",
                         "/v1/dvai/quotas"})


def _keys(request: web.Request) -> ApiKeyStore:
    keys = request.app[CONTEXT].api_keys
    if keys is None:
        raise ServiceUnavailableError("API keys are not available on this node")
    return keys


@routes.get("/v1/dvai/keys")
async def list_keys(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [k.to_json() for k in _keys(request).list()]})


@routes.post("/v1/dvai/keys")
async def create_key(request: web.Request) -> web.Response:
    """``{"appId", "name"?, "scopes"?: {"models", "endpoints", "offload"}, "expiresIn"?: seconds}``;
    the answer carries the key itself, once."""
    keys = _keys(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    name = body.get("name", "")
    if not isinstance(name, str):
        raise InvalidRequestError("'name' must be a string", param="name")
    expires = body.get("expiresIn")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float))
                                or not math.isfinite(expires) or not 0 < expires <= 10 * 365 * 86400):
        raise InvalidRequestError("'expiresIn' must be a number of seconds, at most ten years", param="expiresIn")
    record, token = await asyncio.to_thread(keys.create, body.get("appId"), name=name,  # type: ignore[arg-type]
                                            scopes=parse_scopes(body.get("scopes")), expires_in_s=expires)
    return web.json_response({**record.to_json(), "key": token}, status=201)


@routes.delete("/v1/dvai/keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    key_id = request.match_info["key_id"]
    record = await asyncio.to_thread(_keys(request).revoke, key_id)
    if record is None:
        raise NotFoundError(f"no API key with id {key_id[:40]!r}", param="key_id")
    return web.json_response(record.to_json())


@routes.get("/v1/dvai/usage")
async def usage(request: web.Request) -> web.Response:
    """Requests and tokens per UTC day, app, device and model: ``?days=7&app=com.acme.chat``."""
    store = request.app[CONTEXT].usage
    if store is None:
        raise ServiceUnavailableError("usage accounting is not available on this node")
    days = _query_days(request, default=7)
    app_id = request.query.get("app")
    rows = await asyncio.to_thread(store.query, days=days, app_id=app_id[:128] if app_id else None)
    return web.json_response({"object": "list", "data": rows})


# -- who uses the hub: apps, devices, quotas -------------------------------------------


def _query_days(request: web.Request, *, default: int) -> int:
    """``?days=`` of a usage listing: 1 to 3660 (ten years)."""
    raw_days = request.query.get("days", str(default))
    if not raw_days.isdigit() or not 1 <= int(raw_days) <= 3660:
        raise InvalidRequestError("'days' must be an integer from 1 to 3660", param="days")
    return int(raw_days)


async def _usage_rows(request: web.Request) -> list[dict[str, Any]]:
    days = _query_days(request, default=30)
    store = request.app[CONTEXT].usage
    return [] if store is None else await asyncio.to_thread(store.query, days=days)


@routes.get("/v1/dvai/apps")
async def list_apps(request: web.Request) -> web.Response:
    """Every app: the devices it is paired on, its API keys, its usage over ``?days=30``."""
    context = request.app[CONTEXT]
    rows = await _usage_rows(request)
    pairings = context.pairings.list() if context.pairings is not None else []
    keys = context.api_keys.list() if context.api_keys is not None else []
    return web.json_response({"object": "list", "data": apps_json(pairings, keys, rows, now_ms=unix_ms())})


@routes.get("/v1/dvai/devices")
async def list_devices(request: web.Request) -> web.Response:
    """Every device: the apps paired on it, whether we may call it, its usage over ``?days=30``."""
    context = request.app[CONTEXT]
    rows = await _usage_rows(request)
    pairings = context.pairings.list() if context.pairings is not None else []
    return web.json_response({"object": "list", "data": devices_json(pairings, rows)})


@routes.get("/v1/dvai/quotas")
async def list_quotas(request: web.Request) -> web.Response:
    """The quota rules in force (configured, or hub mode's defaults)."""
    config = request.app[CONTEXT].config
    return web.json_response({"object": "list", "hubMode": config.hub.enabled,
                              "data": quota_rules_json(config.hub.quotas)})
