"""Tool calls in OpenAI's chat-completion shapes (whole messages and stream deltas)."""

from __future__ import annotations

from typing import Any

from .base import ToolCall
from .tools import StreamEvent, TextDelta, ToolArgumentsDelta, ToolCallStart


def call_json(call: ToolCall) -> dict[str, Any]:
    """``message.tool_calls[i]``."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def stream_delta(event: StreamEvent, parallel: bool = True) -> dict[str, Any] | None:
    """The ``delta`` of a chat chunk for one stream event (None: nothing to send).

    A call starts with its id, type, name and empty ``arguments``; the arguments follow in
    pieces under the same ``index``. Without ``parallel_tool_calls`` only the first call is sent.
    """
    if isinstance(event, TextDelta):
        return {"content": event.text} if event.text else None
    if not parallel and event.index > 0:
        return None
    if isinstance(event, ToolCallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    assert isinstance(event, ToolArgumentsDelta)
    if not event.text:
        return None
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
