"""The composition root: builds the aiohttp application around a NodeContext."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from .api import keys, mesh, metrics, offload, openai, peers, responses, trust
from .api.middlewares import error_middleware, origin_middleware
from .api.record import RecordReader, audit_reader, log_request, make_record_middleware
from .context import CONTEXT, NodeContext
from .security import DEFAULT_PUBLIC_PATHS, make_security_middleware


def build_app(
    context: NodeContext,
    *,
    middlewares: Iterable[Any] = (),
    route_tables: Iterable[web.RouteTableDef] = (),
) -> web.Application:
    """The node's HTTP application. ``middlewares`` run inside the error middleware."""
    config = context.config
    # Outermost first: errors → the request record (sees every status; read by audit, metrics and
    # the request log) → CORS/origin → signatures and exposure.
    readers: list[RecordReader] = []
    if context.audit is not None:
        readers.append(audit_reader(context.audit))
    if context.metrics is not None:
        readers.append(context.metrics.observe_request)
    if context.usage is not None:
        readers.append(context.usage.record)
    readers.append(log_request)
    stack: list[Any] = [error_middleware, make_record_middleware(readers), origin_middleware(config.cors_origin)]
    if context.pairings is not None and context.nonces is not None:
        public = DEFAULT_PUBLIC_PATHS | ({metrics.METRICS_PATH} if config.security.public_metrics else set())
        stack.append(make_security_middleware(config, context.pairings, context.nonces, public_paths=public,
                                              loopback_only_paths=trust.ADMIN_PATHS | keys.ADMIN_PATHS | mesh.ADMIN_PATHS,
                                              render_errors=False, api_keys=context.api_keys))
    stack.extend(middlewares)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=stack)
    app[CONTEXT] = context
    app.add_routes(openai.routes)
    app.add_routes(responses.routes)
    app.add_routes(mesh.routes)
    app.add_routes(trust.routes)
    app.add_routes(peers.routes)
    app.add_routes(metrics.routes)
    app.add_routes(offload.routes)
    app.add_routes(keys.routes)
    for table in route_tables:
        app.add_routes(table)
    return app
