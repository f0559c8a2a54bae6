"""The OpenAI surface: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Handlers are thin: read JSON, parse it into an engine request, let the offload router
place it (when offload is on), and write the answer — the local engine's, or a peer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

from aiohttp import web

from ..common.errors import ModelNotFoundError
from ..constants import HOP_HEADER, OFFLOAD_HEADER, SERVED_BY_HEADER, SUBSTITUTED_HEADER
from ..context import CONTEXT, NodeContext
from ..engine.requests import ChatRequest, GenerationRequest
from ..hub.interceptor import InterceptContext, InterceptedResponse, run_interceptor
from ..hub.keys import check_scopes
from ..hub.quotas import QuotaLease, QuotaSubject
from ..hub.substitution import UnknownFamilyError, choose_substitute
from ..offload.forward import ForwardCall
from ..offload.policy import OffloadMode, parse_offload_header
from ..offload.router import Forwarded, Refused, RoutedRequest
from ..security.guard import attribution_of, audit_peer_of
from .jsonbody import read_json
from .middlewares import REQUEST_ID
from .record import RECORD
from .schemas import parse_chat_request, parse_completion_request, parse_embedding_request
from .sse import stream_events, write_peer_answer

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    payload = await read_json(request)
    return await serve(request, payload, parse_chat_request(payload), intercept=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    payload = await read_json(request)
    return await serve(request, payload, parse_completion_request(payload))


async def serve(request: web.Request, payload: dict[str, Any], parsed: GenerationRequest, *,
                intercept: bool = False) -> web.StreamResponse:
    """Admit the caller (key scopes, quotas), let the interceptor see it, then generate."""
    async with admitted(request, parsed.model) as may_offload:
        if intercept and (answer := await intercepted(request, payload, parsed.model)) is not None:
            return answer
        return await generate(request, payload, parsed, may_offload=may_offload)


@contextlib.asynccontextmanager
async def admitted(request: web.Request, model: str) -> AsyncIterator[bool]:
    """The hub's admission of a request for ``model``, shared by every generating endpoint: the
    record learns who asks (its app id is the request's class in the model's fair queue), the
    API key's model scope is checked (403), the request is counted against the caller's quotas
    (429 + ``Retry-After``) and holds its concurrency lease until the answer is complete.
    Yields whether the request may be offloaded."""
    context = request.app[CONTEXT]
    record = request[RECORD]
    record.requested(model)
    record.app_id, record.peer_device_id = attribution_of(request).app_id, audit_peer_of(request)
    may_offload = key_allows(request, context, model)
    lease = admit(request, context, model)
    try:
        yield may_offload
    finally:
        if lease is not None:
            lease.release()


async def intercepted(request: web.Request, payload: dict[str, Any], model: str, *,
                      named_events: bool = False) -> web.StreamResponse | None:
    """The interceptor's answer to this request (written), or None when it falls through or
    none is installed. ``named_events``: a stream it returns is sent as Responses events."""
    context = request.app[CONTEXT]
    if context.interceptor is None:
        return None
    attribution = attribution_of(request)
    answer = await run_interceptor(context.interceptor, payload, InterceptContext(
        app_id=attribution.app_id, peer_device_id=audit_peer_of(request), api_key_id=attribution.api_key,
        request_id=request.get(REQUEST_ID, ""), model=model, endpoint=request.path), request.headers)
    if answer is None:
        return None
    return await write_intercepted(request, answer, named_events=named_events)


async def generate(request: web.Request, payload: dict[str, Any], parsed: GenerationRequest, *,
                   may_offload: bool = True) -> web.StreamResponse:
    """Offload it, or run it here: one JSON answer or an SSE stream, recorded either way."""
    context = request.app[CONTEXT]
    record = request[RECORD]
    requested = parsed.model
    parsed = substituted(context, parsed)
    external = context.external.engine_for(parsed.model) if context.external else None
    if external is not None:
        call = ForwardCall(request.raw_path, await request.read() if parsed.model == requested
                           else json.dumps({**payload, "model": parsed.model}).encode(), parsed.stream,
                           request.get(REQUEST_ID) or None)
        return await write_peer_answer(request, await external.open(call, parsed.model, record))
    if context.router is not None:  # offload disabled: X-DVAI-Offload is ignored, as a single node
        outcome = await context.router.route(await routed(request, payload, parsed, may_offload=may_offload))
        if isinstance(outcome, Forwarded):
            return await write_peer_answer(request, outcome.answer)
        if isinstance(outcome, Refused):
            raise outcome.error
    headers = served_here(context, requested=requested, served=parsed.model)
    if parsed.stream:
        return await stream_events(request, context.inference.stream(parsed, record), headers=headers,
                                   record=record)
    return web.json_response(await context.inference.complete(parsed, record), headers=headers)


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    parsed = parse_embedding_request(await read_json(request))
    context = request.app[CONTEXT]
    async with admitted(request, parsed.model):  # always local: embeddings are not offloaded (docs/offload.md)
        return web.json_response(await context.inference.embeddings(parsed, request[RECORD]),
                                 headers=served_here(context))


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    listing = context.inference.list_models()
    if context.external:
        listing["data"] += context.external.list_models(int(context.registry.started_at))
    return web.json_response(listing)


async def routed(request: web.Request, payload: dict[str, Any], parsed: GenerationRequest, *,
                 may_offload: bool = True, needs: frozenset[str] = frozenset()) -> RoutedRequest:
    """What the router needs to know of this request, as plain values."""
    marked = HOP_HEADER in request.headers
    mode = parse_offload_header(request.headers.get(OFFLOAD_HEADER))
    return RoutedRequest(
        path=request.raw_path, model=parsed.model, stream=parsed.stream, body=await request.read(),
        payload=payload, mode=mode if may_offload else OffloadMode.NEVER, marked=marked,
        hop=marked and attribution_of(request).signed, request_id=request.get(REQUEST_ID, ""),
        record=request[RECORD], needs=needs or required_features(parsed),
    )


def required_features(parsed: GenerationRequest) -> frozenset[str]:
    """What a peer's model must list in its health report to serve this request (``ModelInfo.features``)."""
    if not isinstance(parsed, ChatRequest):
        return frozenset()
    needs = set()
    if parsed.reads_calls:
        needs.add("tools")
    if parsed.params.grammar is not None and not parsed.tool_choice.forced:
        needs.add("structured_outputs")
    return frozenset(needs)


def key_allows(request: web.Request, context: NodeContext, model: str) -> bool:
    """Check an API key's model scope (403 when out of scope); whether it lets the request be offloaded."""
    key_id = attribution_of(request).api_key
    key = context.api_keys.get(key_id) if key_id is not None and context.api_keys is not None else None
    if key is None:
        return True
    check_scopes(key, path=request.path, model=model)
    return key.scopes.offload


def admit(request: web.Request, context: NodeContext, model: str) -> QuotaLease | None:
    """Count the request against the caller's quotas (429 when over); the lease to release at its end."""
    if not context.quotas:
        return None
    return context.quotas.admit(QuotaSubject(attribution_of(request).app_id, audit_peer_of(request), model))


Generating = TypeVar("Generating", bound=GenerationRequest)


def substituted(context: NodeContext, parsed: Generating) -> Generating:
    """The request, for the model the substitution policy picks when neither this node nor a
    peer serves the one asked for (unchanged otherwise)."""
    policy = context.substitution
    external = context.external.model_ids() if context.external else []
    if (policy is None or context.registry.serves(parsed.model) or parsed.model in external
            or _a_peer_serves(context, parsed.model)):
        return parsed
    available = [slot.info.id for slot in context.registry.slots() if not slot.info.embedding] + external
    try:
        choice = choose_substitute(parsed.model, available, policy)
    except UnknownFamilyError:
        raise ModelNotFoundError(parsed.model, available,
                                 reason="its name does not say which model family it is, so no substitute "
                                        "can be chosen") from None
    return parsed if choice is None else dataclasses.replace(parsed, model=choice)


def _a_peer_serves(context: NodeContext, model: str) -> bool:
    if context.router is None or context.peers is None:
        return False
    return any(model in peer.loaded_models for peer in context.peers.snapshot())


async def write_intercepted(request: web.Request, answer: InterceptedResponse, *,
                            named_events: bool = False) -> web.StreamResponse:
    if answer.stream is not None:
        return await stream_events(request, _as_dicts(answer.stream), headers=dict(answer.headers),
                                   record=request[RECORD], named_events=named_events)
    return web.json_response(dict(answer.body or {}), status=answer.status, headers=dict(answer.headers))


async def _as_dicts(chunks: AsyncIterator[Mapping[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async for chunk in chunks:
        yield dict(chunk)


def served_here(context: NodeContext, *, requested: str | None = None, served: str | None = None,
                served_by: str | None = None) -> dict[str, str]:
    """``X-DVAI-Served-By``: this device's id on answers served here, or ``served_by`` (an external
    engine's ``external:<name>``); and ``X-DVAI-Substituted``, the model asked for, when
    ``served`` is a substitute for ``requested``."""
    headers = {SERVED_BY_HEADER: served_by or context.identity.device_id}
    if requested is not None and served is not None and served != requested:
        headers[SUBSTITUTED_HEADER] = requested[:200]
    return headers
