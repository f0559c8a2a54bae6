"""``GET /v1/dvai/peers``: the peer table (discovery runs only with offload enabled)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..common.errors import OffloadDisabledError
from ..context import CONTEXT, NodeContext

routes = web.RouteTableDef()


def peers_body(context: NodeContext) -> dict[str, Any]:
    if context.peers is None:
        raise OffloadDisabledError("peer discovery runs")
    links = context.links
    data = []
    for peer in context.peers.snapshot():
        item = peer.to_json()
        info = links.info(peer.device_id) if links is not None else None
        if info is not None or peer.via == "rendezvous":
            # the WebRTC link: connecting, direct, relayed (via TURN), closed or failed; RTT in ms
            item["link"] = info.to_json() if info is not None else None
        data.append(item)
    return {"object": "list", "deviceId": context.identity.device_id, "data": data}


@routes.get("/v1/dvai/peers")
async def peers(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    if request.query.get("fresh") in ("1", "true") and context.discovery is not None:
        await context.discovery.check_now()
    return web.json_response(peers_body(context))
