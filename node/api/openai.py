"""The OpenAI surface: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Handlers are thin: read JSON, parse into a typed request, hand it to the
inference service, shape the HTTP response.
"""

from __future__ import annotations

from aiohttp import web

from ..context import CONTEXT
from ..inference import UsageRecord
from .middlewares import read_json
from .schemas import parse_chat_request, parse_completion_request, parse_embedding_request
from .sse import stream_events

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    parsed = parse_chat_request(await read_json(request))
    service = request.app[CONTEXT].inference
    usage = UsageRecord(model=parsed.model)
    if parsed.stream:
        return await stream_events(request, service.chat_stream(parsed, usage))
    return web.json_response(await service.chat(parsed, usage))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    parsed = parse_completion_request(await read_json(request))
    service = request.app[CONTEXT].inference
    usage = UsageRecord(model=parsed.model)
    if parsed.stream:
        return await stream_events(request, service.completion_stream(parsed, usage))
    return web.json_response(await service.completion(parsed, usage))


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    parsed = parse_embedding_request(await read_json(request))
    return web.json_response(await request.app[CONTEXT].inference.embeddings(parsed))


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONTEXT].inference.list_models())
