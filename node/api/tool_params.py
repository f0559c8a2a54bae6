"""Parsing tools, ``tool_choice``, output formats and tool messages (chat and Responses alike).

Pure functions raising :class:`InvalidRequestError` with ``param`` naming the field, so a
malformed tool schema or an unknown function never reaches the engine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..common.errors import InvalidRequestError
from ..constants import MAX_TOOLS
from ..engine.base import ChatMessage, ToolCall
from ..engine.grammar import JSON_OBJECT_GRAMMAR, SchemaError, compact_json, schema_to_grammar
from ..engine.tools import FunctionTool, ToolChoice, call_grammar

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}}


def parse_tools(value: Any, *, param: str = "tools", flat: bool = False) -> tuple[FunctionTool, ...]:
    """Function tools: chat's ``{"type": "function", "function": {…}}`` or, ``flat``, the
    Responses API's ``{"type": "function", "name": …, "parameters": …}``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequestError(f"'{param}' must be a list of tools", param=param)
    if len(value) > MAX_TOOLS:
        raise InvalidRequestError(f"at most {MAX_TOOLS} tools per request", param=param)
    tools: list[FunctionTool] = []
    for index, item in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        if item.get("type") != "function":
            raise InvalidRequestError(
                f"{where}.type must be 'function' (got {str(item.get('type'))[:40]!r}); only function tools "
                "are supported", param=f"{where}.type")
        spec = item if flat else item.get("function")
        prefix = where if flat else f"{where}.function"
        if not isinstance(spec, dict):
            raise InvalidRequestError(f"{prefix} must be an object", param=prefix)
        tools.append(_function(spec, prefix))
    names = [t.name for t in tools]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise InvalidRequestError(f"two tools are named '{name}'", param=f"{param}[{index}]")
    return tuple(tools)


def _function(spec: dict[str, Any], where: str) -> FunctionTool:
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(
            f"{where}.name must be 1-64 letters, digits, '_' or '-'", param=f"{where}.name")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(f"{where}.description must be a string", param=f"{where}.description")
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = EMPTY_PARAMETERS
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"{where}.parameters must be a JSON schema object", param=f"{where}.parameters")
    if parameters.get("type", "object") != "object":
        raise InvalidRequestError(f"{where}.parameters must describe an object (\"type\": \"object\")",
                                  param=f"{where}.parameters.type")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{where}.strict must be a boolean", param=f"{where}.strict")
    check_schema(parameters, f"{where}.parameters")
    return FunctionTool(name=name, description=description, parameters=parameters, strict=bool(strict))


def check_schema(schema: Any, param: str) -> str:
    """The grammar for ``schema``, or the 400 naming the keyword it cannot honour."""
    try:
        return schema_to_grammar(schema)
    except SchemaError as exc:
        where = f"{param}.{exc.path}" if exc.path else param
        raise InvalidRequestError(f"{where}: {exc.message}", param=where, code="unsupported_schema") from None


def parse_tool_choice(value: Any, tools: tuple[FunctionTool, ...], *, param: str = "tool_choice",
                      flat: bool = False) -> ToolChoice:
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise InvalidRequestError("tool_choice 'required' needs 'tools'", param=param)
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") == "function":
        spec = value if flat else value.get("function")
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError(f"{param} must name a function", param=param)
        if name not in {t.name for t in tools}:
            known = ", ".join(t.name for t in tools) or "none"
            raise InvalidRequestError(f"{param} names '{name[:64]}', which is not among the tools ({known})",
                                      param=param)
        return ToolChoice("function", name)
    raise InvalidRequestError(
        f"{param} must be 'none', 'auto', 'required' or a function", param=param)


def tool_choice_json(choice: ToolChoice, *, flat: bool = False) -> Any:
    """``choice`` as ``tool_choice`` JSON (``flat``: the Responses form), as ``parse_tool_choice`` reads it."""
    if choice.mode != "function":
        return choice.mode
    if flat:
        return {"type": "function", "name": choice.name}
    return {"type": "function", "function": {"name": choice.name}}


def chat_response_format(text_format: Mapping[str, Any]) -> dict[str, Any] | None:
    """A Responses ``text.format`` (already checked) as chat's ``response_format``; None for plain text."""
    kind = text_format.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in text_format.items() if k != "type"}}
    return None


def tool_grammar(tools: tuple[FunctionTool, ...], choice: ToolChoice, parallel: bool) -> str | None:
    """The grammar forcing a call, for ``required`` and a named function; None otherwise."""
    if not tools or not choice.forced:
        return None
    return call_grammar(tools, choice, parallel=parallel and choice.mode == "required")


def parse_response_format(value: Any, *, param: str = "response_format", flat: bool = False) -> str | None:
    """The grammar a ``response_format`` (chat) or ``text.format`` (Responses, ``flat``) asks for."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"'{param}' must be an object", param=param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind == "json_schema":
        spec = value if flat else value.get("json_schema")
        where = param if flat else f"{param}.json_schema"
        if not isinstance(spec, dict):
            raise InvalidRequestError(f"'{where}' must be an object", param=where)
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise InvalidRequestError(f"{where}.name must be 1-64 letters, digits, '_' or '-'",
                                      param=f"{where}.name")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"{where}.schema must be a JSON schema object", param=f"{where}.schema")
        return check_schema(schema, f"{where}.schema")
    raise InvalidRequestError(f"{param}.type must be 'text', 'json_object' or 'json_schema'",
                              param=f"{param}.type")


def parse_tool_calls_field(value: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequestError(f"{where} must be a list", param=where)
    calls = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidRequestError(f"{at} must be {{\"id\", \"type\": \"function\", \"function\"}}", param=at)
        call_id, name = item.get("id"), function.get("name")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequestError(f"{at}.id must be a non-empty string", param=f"{at}.id")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"{at}.function.name must be a string", param=f"{at}.function.name")
        calls.append(ToolCall(call_id, name, arguments_text(function.get("arguments"), f"{at}.function.arguments")))
    return tuple(calls)


def arguments_text(value: Any, where: str) -> str:
    """A call's ``arguments``: JSON text of an object (an object is accepted and serialised)."""
    if isinstance(value, dict):
        return compact_json(value)
    if value is None or value == "":
        return "{}"
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return compact_json(parsed)
    raise InvalidRequestError(f"{where} must be JSON text of an object", param=where)


def link_tool_results(messages: list[ChatMessage], param: str = "messages") -> list[ChatMessage]:
    """Give each tool result its call's function name; a result without a matching call is a 400."""
    calls: dict[str, str] = {}
    out = []
    for index, message in enumerate(messages):
        for call in message.tool_calls:
            calls[call.id] = call.name
        if message.role == "tool":
            name = calls.get(message.tool_call_id or "")
            if name is None:
                raise InvalidRequestError(
                    f"{param}[{index}] answers tool call {str(message.tool_call_id)[:64]!r}, which no earlier "
                    "assistant message made", param=f"{param}[{index}].tool_call_id")
            message = ChatMessage("tool", message.content, tool_call_id=message.tool_call_id, name=name)
        out.append(message)
    return out

