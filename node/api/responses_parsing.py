"""Parsing ``POST /v1/responses`` bodies into a chat request plus what the answer echoes.

The node's Responses API is stateless: ``store: true``, ``previous_response_id``,
``conversation`` and ``background`` are refused with a 400 saying so; the whole
conversation travels in ``input`` (messages, ``function_call`` and
``function_call_output`` items), as the OpenAI SDKs do with ``store=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..common.errors import InvalidRequestError, UnsupportedParameterError
from ..constants import MAX_TOKENS_CAP
from ..engine.base import ChatMessage, SamplingParams, ToolCall
from ..engine.requests import ChatRequest
from .tool_params import (
    arguments_text,
    link_tool_results,
    parse_response_format,
    parse_tool_choice,
    parse_tools,
    tool_choice_json,
    tool_grammar,
)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text")
_STATEFUL = ("previous_response_id", "conversation")


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    chat: ChatRequest
    """the same generation expressed as a chat request (one generation path)."""
    instructions: str | None = None
    max_output_tokens: int | None = None
    text_format: dict[str, Any] = field(default_factory=lambda: {"type": "text"})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.chat.model

    @property
    def stream(self) -> bool:
        return self.chat.stream


def parse_responses_request(body: Any) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    for name in _STATEFUL:
        if body.get(name) is not None:
            raise UnsupportedParameterError(
                f"'{name}' is not supported: this node's Responses API is stateless; send the whole "
                "conversation in 'input'", param=name)
    if body.get("store") is True:
        raise UnsupportedParameterError(
            "'store: true' is not supported: this node's Responses API is stateless (responses are not "
            "kept); send 'store': false or leave it out", param="store")
    if body.get("background") is True:
        raise UnsupportedParameterError("background responses are not supported", param="background")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("'model' is required and must be a non-empty string", param="model")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequestError("'instructions' must be a string", param="instructions")
    messages = _input(body.get("input"))
    if instructions:
        messages.insert(0, ChatMessage("system", instructions))
    messages = link_tool_results(messages, "input")
    tools = parse_tools(body.get("tools"), flat=True)
    choice = parse_tool_choice(body.get("tool_choice"), tools, flat=True)
    parallel = _bool(body, "parallel_tool_calls", True)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise InvalidRequestError("'text' must be an object", param="text")
    text_format = (text or {}).get("format") or {"type": "text"}
    format_grammar = parse_response_format(text_format, param="text.format", flat=True)
    max_tokens = _int(body, "max_output_tokens", 1, MAX_TOKENS_CAP)
    stream = _bool(body, "stream", False)
    chat = ChatRequest(
        model=model,
        messages=tuple(messages),
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 0.0, 2.0),
            top_p=_number(body, "top_p", 0.0, 1.0),
            grammar=tool_grammar(tools, choice, parallel) or format_grammar,
        ),
        stream=stream,
        include_usage=stream,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )
    metadata = body.get("metadata")
    return ResponsesRequest(
        chat=chat,
        instructions=instructions,
        max_output_tokens=max_tokens,
        text_format=dict(text_format),
        tool_choice=tool_choice_json(choice, flat=True),
        tools=[{"type": "function", "name": t.name, "description": t.description,
                "parameters": dict(t.parameters), "strict": t.strict} for t in tools],
        metadata=metadata if isinstance(metadata, dict) else {},
    )


def _input(value: Any) -> list[ChatMessage]:
    if isinstance(value, str):
        return [ChatMessage("user", value)]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("'input' must be a string or a non-empty list of items", param="input")
    out: list[ChatMessage] = []
    calls: set[str] = set()
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            call = ToolCall(_text(item, "call_id", where), _text(item, "name", where),
                            arguments_text(item.get("arguments"), f"{where}.arguments"))
            calls.add(call.id)
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                out[-1] = ChatMessage("assistant", last.content, tool_calls=(*last.tool_calls, call))
            elif last is not None and last.role == "assistant" and not last.tool_calls:
                out[-1] = ChatMessage("assistant", last.content, tool_calls=(call,))
            else:
                out.append(ChatMessage("assistant", "", tool_calls=(call,)))
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = _content(output, f"{where}.output")
            call_id = _text(item, "call_id", where)
            if call_id not in calls:
                raise InvalidRequestError(f"{where} answers call {call_id[:64]!r}, which no earlier "
                                          "function_call item made", param=f"{where}.call_id")
            out.append(ChatMessage("tool", output, tool_call_id=call_id))
        elif kind == "reasoning":
            continue  # a model's reasoning summary from an earlier turn: nothing to replay here
        else:
            raise InvalidRequestError(
                f"{where}.type {str(kind)[:40]!r} is not supported (message, function_call, "
                "function_call_output)", param=f"{where}.type")
    return out


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise InvalidRequestError(f"{where}.role must be one of system, developer, user, assistant",
                                  param=f"{where}.role")
    return ChatMessage(role, _content(item.get("content"), f"{where}.content"))  # type: ignore[arg-type]


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS \
                    or not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"{where}[{index}]: only text parts (input_text, output_text) are "
                                          "supported", param=f"{where}[{index}]")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequestError(f"{where} must be a string or a list of text parts", param=where)


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{where}.{key} must be a non-empty string", param=f"{where}.{key}")
    return value


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be a boolean", param=name)
    return value


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be an integer from {low} to {high}", param=name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    """The field's value; None (absent or null): the model's default."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be a number from {low:g} to {high:g}", param=name)
    return float(value)
