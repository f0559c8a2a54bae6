"""The OpenAI surface: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Handlers are thin: read JSON, parse into a typed request, hand it to the
inference service, shape the HTTP response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from ..constants import SERVED_BY_HEADER
from ..context import CONTEXT
from ..inference import UsageRecord
from ..security import AUDIT_DETAILS_KEY
from .middlewares import REQUEST_ID, read_json
from .schemas import (
    ChatRequest,
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
    parse_embedding_request,
)
from .sse import stream_events

routes = web.RouteTableDef()
ParsedRequest = ChatRequest | CompletionRequest


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    parsed = parse_chat_request(await read_json(request))
    service = request.app[CONTEXT].inference
    return await generate(request, parsed, service.chat, service.chat_stream)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    parsed = parse_completion_request(await read_json(request))
    service = request.app[CONTEXT].inference
    return await generate(request, parsed, service.completion, service.completion_stream)


async def generate(
    request: web.Request,
    parsed: ParsedRequest,
    whole: Callable[[Any, UsageRecord], Awaitable[dict[str, Any]]],
    streamed: Callable[[Any, UsageRecord], AsyncIterator[dict[str, Any]]],
) -> web.StreamResponse:
    """Offload it, or run it here: one JSON answer or an SSE stream, audited either way."""
    details = audit_details(request, parsed.model)
    forwarded = await offload(request, parsed.model, parsed.stream)
    if forwarded is not None:
        return forwarded
    usage = UsageRecord(model=parsed.model)
    headers = served_by_header(request)
    try:
        if parsed.stream:
            return await stream_events(request, streamed(parsed, usage), headers=headers, details=details)
        return web.json_response(await whole(parsed, usage), headers=headers)
    finally:
        record_usage(details, usage)


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    parsed = parse_embedding_request(await read_json(request))
    usage = UsageRecord(model=parsed.model)
    details = audit_details(request, parsed.model)
    try:  # always local: embeddings are not offloaded (docs/offload.md)
        return web.json_response(await request.app[CONTEXT].inference.embeddings(parsed, usage),
                                 headers=served_by_header(request))
    finally:
        record_usage(details, usage)


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONTEXT].inference.list_models())


async def offload(request: web.Request, model: str, stream: bool) -> web.StreamResponse | None:
    """Let the offload router place the request: the forwarded answer, or None to serve it here.

    Without a router (offload disabled) ``X-DVAI-Offload`` is ignored: the node behaves exactly
    as a single node, as the reference's library does with offload unset.
    """
    router = request.app[CONTEXT].router
    if router is None:
        return None
    return await router.route(request, model, stream=stream, request_id=request.get(REQUEST_ID, ""))


def served_by_header(request: web.Request) -> dict[str, str]:
    """``X-DVAI-Served-By``: this device's id on answers served here."""
    return {SERVED_BY_HEADER: request.app[CONTEXT].identity.device_id}


def audit_details(request: web.Request, model: str) -> dict[str, object]:
    """The audit row's details for this request (a throwaway dict when audit is off)."""
    details: dict[str, object] | None = request.get(AUDIT_DETAILS_KEY)
    if details is None:
        details = request[AUDIT_DETAILS_KEY] = {}
    details["model_requested"] = model
    return details


def record_usage(details: dict[str, object], usage: UsageRecord, served_by: str = "local") -> None:
    details.update(model_served=usage.model, prompt_tokens=usage.prompt_tokens,
                   completion_tokens=usage.completion_tokens, served_by=served_by,
                   first_token_s=usage.first_token_s, decode_tok_per_s=usage.decode_tok_per_s)
