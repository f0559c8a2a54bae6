"""``GET /v1/dvai/offload``: the offload router's view of its peers (counters, circuits, verified rates)."""

from __future__ import annotations

from aiohttp import web

from ..context import CONTEXT
from ..errors import NotFoundError

routes = web.RouteTableDef()


class OffloadDisabledError(NotFoundError):
    code = "offload_disabled"

    def __init__(self) -> None:
        super().__init__(
            "the offload router runs only with offload enabled; set `enabled = true` under [offload] "
            "(or DVAI_OFFLOAD__ENABLED=true) and restart the node"
        )


@routes.get("/v1/dvai/offload")
async def offload_status(request: web.Request) -> web.Response:
    router = request.app[CONTEXT].router
    if router is None:
        raise OffloadDisabledError()
    return web.json_response(router.status())
