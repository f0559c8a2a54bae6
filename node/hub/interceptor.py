"""The chat-completion interceptor: a first-chance hook the host application installs.

``Node(chat_completion_interceptor=hook)``; for every ``POST /v1/chat/completions`` and
``POST /v1/responses`` that passed authentication, key scopes and quotas, the node calls
``hook(body, context, headers)`` (a plain or an async function) before anything else serves
it (``context.endpoint`` says which; answer in that endpoint's shape — Responses stream
events carry their ``type``, sent as the SSE event name):

- return ``None`` to fall through to the node's own handling (offload, local engine);
- return a ``dict`` to answer with it as JSON (200);
- return an :class:`InterceptedResponse` for another status, headers, or a stream of
  chunk dicts sent as server-sent events;
- raise a :class:`~node.common.errors.DVAIError` to refuse with its status and OpenAI error body.

Any other exception is logged and answered ``502 interceptor_failed``: a bug in the hook
never becomes a 500 with a stack trace, and never harms other requests.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..common.errors import DVAIError, UpstreamError

__all__ = ["ChatCompletionInterceptor", "InterceptContext", "InterceptedResponse", "run_interceptor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InterceptContext:
    """Who is asking: the authenticated app and device (``anonymous``/``self`` when unsigned)."""

    app_id: str
    peer_device_id: str
    api_key_id: str | None
    request_id: str
    model: str
    endpoint: str = "/v1/chat/completions"
    """the path asked (``/v1/chat/completions`` or ``/v1/responses``): the shape to answer in."""


@dataclass(frozen=True, slots=True)
class InterceptedResponse:
    body: Mapping[str, Any] | None = None
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: AsyncIterator[Mapping[str, Any]] | None = None
    """chunks to send as server-sent events (then ``body`` is ignored)."""


InterceptResult = InterceptedResponse | Mapping[str, Any] | None
ChatCompletionInterceptor = Callable[
    [Mapping[str, Any], InterceptContext, Mapping[str, str]], "InterceptResult | Awaitable[InterceptResult]"]


async def run_interceptor(hook: ChatCompletionInterceptor, body: Mapping[str, Any], context: InterceptContext,
                          headers: Mapping[str, str]) -> InterceptedResponse | None:
    """Call ``hook``; its answer as an :class:`InterceptedResponse`, or None to fall through."""
    try:
        result = hook(body, context, headers)
        if inspect.isawaitable(result):
            result = await result
    except DVAIError:
        raise
    except Exception as exc:  # noqa: BLE001 - the host's bug is reported, not propagated
        log.exception("chat_completion_interceptor failed")
        raise UpstreamError("the chat completion interceptor failed; see the node log",
                            code="interceptor_failed") from exc
    if result is None or isinstance(result, InterceptedResponse):
        return result
    if isinstance(result, Mapping):
        return InterceptedResponse(body=result)
    log.error("chat_completion_interceptor returned %s, not None, a dict or an InterceptedResponse",
              type(result).__name__)
    raise UpstreamError("the chat completion interceptor returned an unusable value", code="interceptor_failed")
