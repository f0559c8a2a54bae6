"""``GET /metrics``: the node's Prometheus metrics (see docs/metrics.md).

Access follows the node's exposure policy (node/security/guard.py): loopback callers
always; from the network, signed requests from paired devices, or anyone when
``security.public_metrics`` (or ``allow_anonymous_lan``) says so.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..common.errors import NotFoundError
from ..context import CONTEXT

METRICS_PATH = "/metrics"

routes = web.RouteTableDef()


@routes.get(METRICS_PATH)
async def metrics(request: web.Request) -> web.Response:
    node_metrics = request.app[CONTEXT].metrics
    if node_metrics is None:
        raise NotFoundError("this node does not collect metrics", code="metrics_disabled")
    return web.Response(body=node_metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                             "Cache-Control": "no-store"})
