"""The rendezvous aiohttp application: routes, error and rate-limit middlewares, lifecycle.

Every error is JSON (``{"error": {message, type, code, param}}``) with a
clear message; no route answers 500 to bad input. Endpoints are listed in
``docs/rendezvous.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Any

from aiohttp import web

from node.common.clock import ms_from_seconds
from node.common.errors import (
    DVAIError,
    InvalidRequestError,
    PayloadTooLargeError,
    RateLimitedError,
    error_body,
    http_error_body,
    http_error_headers,
)
from node.version import __version__

from . import sessions as rules
from .config import RendezvousConfig
from .constants import MAX_CLIENT_ADDRESS_CHARS
from .manager import SessionLimits, SessionManager
from .metrics import CONTENT_TYPE_LATEST, RendezvousMetrics
from .ratelimit import ClientRateLimiter, RateRule
from .sessions import PairingSession, Role, SessionState
from .signaling import RelayLimits, SignalingHub
from .store import RendezvousStore, SQLiteStore

log = logging.getLogger(__name__)

CONFIG_KEY = web.AppKey("rendezvous_config", RendezvousConfig)
STORE_KEY = web.AppKey("rendezvous_store", RendezvousStore)
MANAGER_KEY = web.AppKey("rendezvous_sessions", SessionManager)
HUB_KEY = web.AppKey("rendezvous_hub", SignalingHub)
METRICS_KEY = web.AppKey("rendezvous_metrics", RendezvousMetrics)
LIMITER_KEY = web.AppKey("rendezvous_limiter", ClientRateLimiter)
Clock = Callable[[], float]
CLOCK_KEY: web.AppKey[Clock] = web.AppKey("rendezvous_clock")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    config: RendezvousConfig,
    *,
    store: RendezvousStore | None = None,
    clock: Callable[[], float] = time.time,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> web.Application:
    """The service as an aiohttp app; ``store`` defaults to SQLite at ``config.resolved_db()``."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[_error_middleware, _rate_limit_middleware],
    )
    app[CONFIG_KEY] = config
    app[CLOCK_KEY] = clock
    app[METRICS_KEY] = RendezvousMetrics()
    app[LIMITER_KEY] = ClientRateLimiter(
        {
            "request": RateRule(config.requests_per_minute, config.requests_per_minute),
            "create": RateRule(config.create_per_minute, config.create_per_minute),
            "join": RateRule(config.join_per_minute, config.join_per_minute),
        },
        max_clients=config.tracked_clients,
    )
    app.cleanup_ctx.append(_lifecycle(store, clock, random_bytes))
    app.on_shutdown.append(_release_clients)
    app.router.add_post("/v1/sessions", create_session)
    app.router.add_post("/v1/sessions/{session_id}/join", join_session)
    app.router.add_get("/v1/sessions/{session_id}/events", session_events)
    app.router.add_post("/v1/sessions/{session_id}/confirm", confirm_session)
    app.router.add_post("/v1/sessions/{session_id}/finish", finish_session)
    app.router.add_post("/v1/sessions/{session_id}/abort", abort_session)
    app.router.add_get("/v1/ws", presence_socket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def _lifecycle(
    given_store: RendezvousStore | None, clock: Callable[[], float], random_bytes: Callable[[int], bytes]
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG_KEY]
        metrics_ = app[METRICS_KEY]
        store = given_store or await SQLiteStore.open(config.resolved_db(), cache_size=config.session_cache)
        app[STORE_KEY] = store
        manager = SessionManager(
            store=store,
            limits=SessionLimits(
                ttl=config.session_ttl,
                retention=config.session_retention,
                max_sessions=config.max_sessions,
                max_waiters=config.max_waiters,
            ),
            clock=clock,
            random_bytes=random_bytes,
            on_change=lambda session: _count_outcome(metrics_, session),
        )
        app[MANAGER_KEY] = manager
        app[HUB_KEY] = SignalingHub(
            store=store,
            audience=config.base_url,
            limits=RelayLimits(
                max_message_bytes=config.ws_max_message_bytes,
                messages_per_second=config.ws_messages_per_second,
                burst=config.ws_burst,
                auth_timeout=config.ws_auth_timeout,
                max_connections=config.max_connections,
                turn_secret=config.turn_secret,
                turn_urls=config.turn_urls,
                turn_ttl=config.turn_ttl,
            ),
            metrics=metrics_,
            clock=clock,
            random_bytes=random_bytes,
        )
        sweeper = asyncio.create_task(_sweep_forever(manager, config.sweep_interval), name="rendezvous-sweeper")
        try:
            yield
        finally:
            sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await sweeper
            manager.shut_down()
            await app[HUB_KEY].close_all()
            await store.close()

    return lifecycle


async def _release_clients(app: web.Application) -> None:
    """Before in-flight handlers are awaited at shutdown: answer long-polls, close WebSockets."""
    if MANAGER_KEY in app:
        app[MANAGER_KEY].shut_down()
    if HUB_KEY in app:
        await app[HUB_KEY].close_all()


async def _sweep_forever(manager: SessionManager, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            deleted = await manager.sweep()
        except Exception:  # noqa: BLE001 - a failed sweep is retried next time, never kills the task
            log.exception("session sweep failed")
            continue
        if deleted:
            log.debug("swept %d ended pairing sessions", deleted)


def _count_outcome(metrics_: RendezvousMetrics, session: PairingSession) -> None:
    if session.state is SessionState.OPEN and session.last_seq == 1:
        metrics_.sessions_created.inc()
    elif session.state.ended and session.events and session.events[-1].kind in ("finish", "aborted"):
        metrics_.sessions_ended.labels(session.end_reason or session.state.value).inc()


# --------------------------------------------------------------------------
# Handlers


async def create_session(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    key = rules.parse_public_key(body.get("initiator_public_key"), "initiator_public_key")
    session, token = await request.app[MANAGER_KEY].create(key)
    config = request.app[CONFIG_KEY]
    return web.json_response(
        {
            "session_id": session.id,
            "initiator_token": token,
            "expires_at": ms_from_seconds(session.expires_at),
            "ttl_seconds": config.session_ttl,
            "rendezvous_url": config.base_url,
        },
        status=201,
    )


async def join_session(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    key = rules.parse_public_key(body.get("scanner_public_key"), "scanner_public_key")
    device_id = rules.parse_device_id(body.get("scanner_device_id"), "scanner_device_id")
    session, token = await request.app[MANAGER_KEY].join(request.match_info["session_id"], key, device_id)
    return web.json_response(
        {
            "session_id": session.id,
            "scanner_token": token,
            "initiator_public_key": session.initiator_public_key,
            "expires_at": ms_from_seconds(session.expires_at),
            "state": session.state.value,
        }
    )


async def session_events(request: web.Request) -> web.Response:
    after = _int_query(request, "after", 0, 0, 1_000_000)
    wait = _float_query(request, "wait", 0.0, 0.0, request.app[CONFIG_KEY].long_poll_max)
    session, role = await request.app[MANAGER_KEY].events(
        request.match_info["session_id"], _bearer(request), after=after, wait=wait
    )
    return web.json_response(_session_view(session, role, after))


async def confirm_session(request: web.Request) -> web.Response:
    message = await _message(request)
    session = await request.app[MANAGER_KEY].confirm(request.match_info["session_id"], _bearer(request), message)
    return web.json_response({"session_id": session.id, "state": session.state.value})


async def finish_session(request: web.Request) -> web.Response:
    message = await _message(request)
    session = await request.app[MANAGER_KEY].finish(request.match_info["session_id"], _bearer(request), message)
    return web.json_response({"session_id": session.id, "state": session.state.value})


async def abort_session(request: web.Request) -> web.Response:
    body = await read_json_object(request, allow_empty=True)
    reason = body.get("reason", "cancelled")
    if not isinstance(reason, str):
        raise InvalidRequestError("'reason' must be a string", param="reason")
    session = await request.app[MANAGER_KEY].abort(request.match_info["session_id"], _bearer(request), reason)
    return web.json_response({"session_id": session.id, "state": session.state.value})


async def presence_socket(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    ws = web.WebSocketResponse(max_msg_size=config.ws_max_message_bytes, heartbeat=30.0)
    if not ws.can_prepare(request).ok:
        raise InvalidRequestError("this endpoint speaks WebSocket only (send an Upgrade request)")
    await ws.prepare(request)
    await request.app[HUB_KEY].serve(ws)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(
        {"status": "ok", "version": __version__, "online_devices": request.app[HUB_KEY].online_count}
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --------------------------------------------------------------------------
# Input helpers


async def read_json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object; 413 past the cap, 400 for anything that is not an object."""
    limit = request.app[CONFIG_KEY].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    raw = await request.read()
    if not raw.strip() and allow_empty:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError("request body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return value


async def _message(request: web.Request) -> str:
    body = await read_json_object(request)
    message = body.get("message")
    limit = request.app[CONFIG_KEY].max_confirmation_bytes
    if not isinstance(message, str) or not message:
        raise InvalidRequestError("'message' must be a non-empty string", param="message")
    if len(message) > limit:
        raise PayloadTooLargeError(f"'message' is longer than {limit} characters", param="message")
    return message


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"'{name}' must be an integer", param=name) from exc
    if not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be between {low} and {high}", param=name)
    return value


def _float_query(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"'{name}' must be a number", param=name) from exc
    if value != value or value < low:
        raise InvalidRequestError(f"'{name}' must be a number of at least {low}", param=name)
    return min(value, high)


def _session_view(session: PairingSession, role: Role, after: int) -> dict[str, Any]:
    return {
        "session_id": session.id,
        "role": role.value,
        "state": session.state.value,
        "expires_at": ms_from_seconds(session.expires_at),
        "events": [event.to_json() for event in session.events_after(after)],
        "last_seq": session.last_seq,
    }




def client_address(request: web.Request) -> str:
    if request.app[CONFIG_KEY].trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1][:MAX_CLIENT_ADDRESS_CHARS]
    return request.remote or "unknown"


# --------------------------------------------------------------------------
# Middlewares


_RULE_FOR_ROUTE = {"/v1/sessions": "create", "/v1/sessions/{session_id}/join": "join"}
_UNLIMITED_ROUTES = frozenset({"/healthz", "/metrics"})
"""monitoring must keep working during a flood; both answers are cheap and fixed-size."""


@web.middleware
async def _rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = _route_name(request)
    if route in _UNLIMITED_ROUTES:
        return await handler(request)
    limiter = request.app[LIMITER_KEY]
    now = request.app[CLOCK_KEY]()
    client = client_address(request)
    rules_to_check = ["request"]
    specific = _RULE_FOR_ROUTE.get(route)
    if specific is not None and request.method == "POST":
        rules_to_check.append(specific)
    for rule in rules_to_check:
        wait = limiter.check(rule, client, now)
        if wait > 0:
            request.app[METRICS_KEY].rate_limited.labels(rule).inc()
            raise RateLimitedError(f"too many requests ({rule}); slow down", retry_after=max(1.0, wait))
    return await handler(request)


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = _route_name(request)
    try:
        response = await handler(request)
    except DVAIError as exc:
        response = web.json_response(exc.to_body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        response = _http_exception_response(exc)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the one place an unexpected failure becomes a clean 500
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = error_body("internal error in the rendezvous")
        response = web.json_response(body, status=500)
    request.app[METRICS_KEY].requests.labels(route, str(response.status)).inc()
    return response


def _http_exception_response(exc: web.HTTPException) -> web.Response:
    if exc.status == 413:
        body = PayloadTooLargeError("request body is too large").to_body()
    else:
        body = http_error_body(exc.status, exc.reason or "request failed")
    headers = http_error_headers(exc.headers)
    return web.json_response(body, status=exc.status, headers=headers)


def _route_name(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.route is not None else None
    return resource.canonical if resource is not None else "unmatched"
