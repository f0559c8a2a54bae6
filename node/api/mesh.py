"""The mesh plane: /v1/dvai/*."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from ..context import CONTEXT, NodeContext
from ..version import __version__

routes = web.RouteTableDef()


def health_body(context: NodeContext) -> dict[str, Any]:
    registry = context.registry
    status = "ok" if registry.ready else ("degraded" if registry.failed else "loading")
    models = [
        {
            "id": slot.info.id,
            "state": slot.state,
            "loaded": slot.state == "ready",
            "queueDepth": slot.queue_depth,
            "serves": list(slot.info.serves),
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
    }


@routes.get("/v1/dvai/health")
async def health(request: web.Request) -> web.Response:
    body = health_body(request.app[CONTEXT])
    status = 200 if body["status"] == "ok" else 503
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)
