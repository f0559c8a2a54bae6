"""The mesh plane: /v1/dvai/*."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from ..capability import CapabilityDisabledError, CapabilityService, check_probe_tokens
from ..capability.curve import curve_to_json
from ..common.errors import InvalidRequestError
from ..constants import CAPABILITY_MODEL_ID_MAX_CHARS
from ..context import CONTEXT, NodeContext
from ..engine.slot import ModelSlot, SlotState
from ..identity import make_health_proof
from ..version import __version__
from .jsonbody import read_json

routes = web.RouteTableDef()

STATUS_PATH = "/v1/dvai/status"
MODEL_ADMIN_PREFIX = "/v1/dvai/models/"
ADMIN_PATHS = frozenset({STATUS_PATH, MODEL_ADMIN_PREFIX})
"""loopback-only (or a paired admin device): the status view, and loading/unloading models."""


def health_body(context: NodeContext) -> dict[str, Any]:
    registry = context.registry
    failed = registry.failed
    now = time.monotonic()
    if registry.ready:
        status = "ok"
    elif registry.loading:
        status = "loading"
    else:
        status = "failed" if len(failed) == len(registry.slots()) else "degraded"
    service = context.capability
    curves = service.curves() if service is not None and service.enabled else {}
    models = [
        {
            "id": slot.info.id,
            "state": slot.state.value,
            "loaded": slot.state is SlotState.READY,
            "queueDepth": slot.queue_depth,
            "parallel": slot.parallel,
            "activeSequences": slot.active_sequences,
            "serves": list(slot.info.serves),
            "keepAliveLeftS": _rounded(slot.keep_alive_left(now)),
            "features": list(slot.info.features),
            **({"capabilityCurve": curve_to_json(curves[slot.info.id])} if slot.info.id in curves else {}),
            **({"error": slot.error} if slot.error else {}),
        }
        for slot in registry.slots()
    ]
    return {
        "status": status,
        "version": __version__,
        "uptimeS": round(time.time() - context.started_at, 3),
        "deviceId": context.identity.device_id,
        "deviceName": context.device_name,
        "currentModelId": registry.default_id,
        "models": models,
        "audit": _audit_health(context),
    }


def _audit_health(context: NodeContext) -> dict[str, Any]:
    """The audit log's state and losses (the error text stays in the node log: this is public)."""
    if context.audit is None:
        return {"state": "disabled"}
    health = context.audit.health()
    return {key: health[key] for key in ("state", "writeErrors", "droppedRows")}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@routes.get("/v1/dvai/health")
@routes.get("/health")
@routes.get("/healthz")
async def health(request: web.Request) -> web.Response:
    """``/health`` and ``/healthz`` are aliases (what llama-server users and probes expect)."""
    context = request.app[CONTEXT]
    body = health_body(context)
    if context.node_identity is not None:
        body["instanceId"] = context.node_identity.instance_id
        challenge = request.query.get("challenge")
        if challenge:
            proof = make_health_proof(context.node_identity, challenge)
            if proof is not None:
                body["identityProof"] = proof
    # Callers wait on this: 503 while loading (or when nothing can serve), 200 once it can.
    status = 200 if body["status"] in ("ok", "degraded") else 503
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)


# -- status (loopback admin) -------------------------------------------------------------



def status_body(context: NodeContext, now: float) -> dict[str, Any]:
    """``GET /v1/dvai/status``: models with state, queue and keep-alive left; peers; offload counts.

    ``now`` is ``time.monotonic()`` (the clock of the slots' last use).
    """
    health = health_body(context)
    models = [
        {
            "id": slot.info.id,
            "state": slot.state.value,
            "queueDepth": slot.queue_depth,
            "waiting": slot.waiting,
            "queueLimit": slot.queue_depth_limit,
            "keepAliveS": slot.keep_alive,
            "keepAliveLeftS": _round(slot.keep_alive_left(now)),
            "idleS": _round(slot.idle_for(now)),
            "serves": list(slot.info.serves),
            **({"error": slot.error} if slot.error else {}),
        }
        for slot in context.registry.slots()
    ]
    counters: dict[str, dict[str, Any]] = {}
    if context.router is not None:
        counters = {entry["deviceId"]: entry for entry in context.router.status()["peers"]}
    peers = []
    for peer in context.peers.snapshot() if context.peers is not None else ():
        counted = counters.get(peer.device_id, {})
        peers.append({
            "deviceId": peer.device_id,
            "deviceName": peer.device_name,
            "state": peer.state.value,
            "address": peer.address,
            "loadedModels": list(peer.loaded_models),
            "forwarded": counted.get("requests", 0),
            "failed": counted.get("failures", 0),
            "inFlight": counted.get("inFlight", 0),
            "circuit": counted.get("circuit", "closed"),
        })
    return {
        "object": "dvai.status",
        "status": health["status"],
        "version": health["version"],
        "uptimeS": health["uptimeS"],
        "deviceId": health["deviceId"],
        "deviceName": health["deviceName"],
        "baseUrl": context.base_url,
        "models": models,
        "offload": {
            "enabled": context.config.offload.enabled,
            "forwarded": sum(entry.get("requests", 0) for entry in counters.values()),
            "failed": sum(entry.get("failures", 0) for entry in counters.values()),
            "inFlight": sum(entry.get("inFlight", 0) for entry in counters.values()),
        },
        "peers": peers,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@routes.get(STATUS_PATH)
async def status(request: web.Request) -> web.Response:
    return web.json_response(status_body(request.app[CONTEXT], time.monotonic()))


@routes.get("/v1/dvai/slots")
async def slots(request: web.Request) -> web.Response:
    """Per model: sequence seats, what runs and waits, and the engine's counters (like llama-server's /slots)."""
    return web.json_response({"models": slots_body(request.app[CONTEXT])})


def slots_body(context: NodeContext) -> list[dict[str, Any]]:
    return [
        {
            "id": slot.info.id,
            "state": slot.state.value,
            "parallel": slot.parallel,
            "activeSequences": slot.active_sequences,
            "running": slot.running,
            "waiting": slot.waiting,
            "seats": slot.seat_states(),
            "engine": slot.engine_stats(),
        }
        for slot in context.registry.slots()
    ]


# -- capability ----------------------------------------------------------------------
# Only meaningful with offload enabled (the reference's probeCapability is a no-op
# otherwise): both routes answer 404 ``offload_disabled`` then, saying how to enable it.


def capability_service(context: NodeContext) -> CapabilityService:
    service = context.capability
    if service is None or not service.enabled:
        raise CapabilityDisabledError()
    return service


def capability_body(context: NodeContext, service: CapabilityService) -> dict[str, Any]:
    return {
        "deviceId": context.identity.device_id,
        "models": {model_id: score.to_json() for model_id, score in service.scores().items()},
        "minLocalCapability": context.config.offload.min_local_capability,
    }


def parse_probe_request(body: Any) -> tuple[str | None, int | None]:
    """``{"model"?: id, "tokens"?: n}`` → (model, tokens); ``InvalidRequestError`` otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the probe body must be a JSON object: {\"model\"?: id, \"tokens\"?: n}")
    unknown = sorted(set(body) - {"model", "tokens"})
    if unknown:
        raise InvalidRequestError(f"unknown probe parameter {unknown[0][:40]!r}", param=unknown[0][:40])
    model, tokens = body.get("model"), body.get("tokens")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= CAPABILITY_MODEL_ID_MAX_CHARS):
        raise InvalidRequestError("model must be a model id (a non-empty string)", param="model")
    return model, None if tokens is None else check_probe_tokens(tokens)


@routes.get("/v1/dvai/capability")
async def capability(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    return web.json_response(capability_body(context, capability_service(context)))


@routes.post("/v1/dvai/probe")
async def probe(request: web.Request) -> web.Response:
    """Run a fresh probe (it waits its turn in the model's queue) and return the score."""
    service = capability_service(request.app[CONTEXT])
    model, tokens = parse_probe_request(await read_json(request) if request.body_exists else {})
    score = await service.run_probe(model, tokens)
    return web.json_response(score.to_json())


# -- model admin ------------------------------------------------------------------------


def model_state_body(slot: ModelSlot) -> dict[str, Any]:
    return {"id": slot.info.id, "state": slot.state.value, "loaded": slot.state is SlotState.READY,
            **({"error": slot.error} if slot.error else {})}


@routes.post("/v1/dvai/models/{model}/load")
async def load_model(request: web.Request) -> web.Response:
    """Load a model now (it stays loaded for its configured keep_alive once idle)."""
    slot = request.app[CONTEXT].registry.resolve(request.match_info["model"])
    await slot.ensure_loaded()
    slot.last_used = time.monotonic()
    return web.json_response(model_state_body(slot))


@routes.post("/v1/dvai/models/{model}/unload")
async def unload_model(request: web.Request) -> web.Response:
    """Unload a model once its running request (if any) is done; the next request loads it again."""
    slot = request.app[CONTEXT].registry.resolve(request.match_info["model"])
    await slot.unload()
    return web.json_response(model_state_body(slot))
