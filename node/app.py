"""The composition root: builds the aiohttp application around a NodeContext."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from .api import mesh, openai
from .api.middlewares import cors_middleware, error_middleware
from .context import CONTEXT, NodeContext


def build_app(
    context: NodeContext,
    *,
    middlewares: Iterable[Any] = (),
    route_tables: Iterable[web.RouteTableDef] = (),
) -> web.Application:
    """The node's HTTP application. ``middlewares`` run inside the error middleware."""
    config = context.config
    stack: list[Any] = [error_middleware]
    if config.cors_origin:
        stack.append(cors_middleware(config.cors_origin))
    stack.extend(middlewares)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=stack)
    app[CONTEXT] = context
    app.add_routes(openai.routes)
    app.add_routes(mesh.routes)
    for table in route_tables:
        app.add_routes(table)
    return app
