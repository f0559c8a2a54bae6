"""``GET /v1/dvai/offload``: the offload router's view of its peers (counters, circuits, verified rates)."""

from __future__ import annotations

from aiohttp import web

from ..common.errors import OffloadDisabledError
from ..context import CONTEXT

routes = web.RouteTableDef()


@routes.get("/v1/dvai/offload")
async def offload_status(request: web.Request) -> web.Response:
    router = request.app[CONTEXT].router
    if router is None:
        raise OffloadDisabledError("the offload router runs")
    return web.json_response(router.status())
