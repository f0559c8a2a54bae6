"""Parsing and validating OpenAI request bodies into plain, typed requests.

Pure functions: a body (already decoded JSON) goes in, a frozen request comes
out, or an :class:`InvalidRequestError` naming the offending parameter.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

from ..common.errors import InvalidRequestError, UnsupportedParameterError
from ..constants import (
    KEEP_ALIVE_MAX_S,
    MAX_CHOICES,
    MAX_COMPLETION_LOGPROBS,
    MAX_COMPLETION_PROMPTS,
    MAX_EMBEDDING_INPUTS,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_CAP,
    MAX_TOP_LOGPROBS,
)
from ..engine.base import ChatMessage, SamplingParams
from ..engine.requests import ChatRequest, CompletionRequest, EmbeddingRequest
from ..engine.tool_output import call_json
from .tool_params import (
    link_tool_results,
    parse_response_format,
    parse_tool_calls_field,
    parse_tool_choice,
    parse_tools,
    tool_choice_json,
    tool_grammar,
)

# Parameters we recognise but do not implement: a clear 400 beats silently ignoring them.
_UNSUPPORTED_CHAT = ("functions", "function_call", "logit_bias",
                     "audio", "modalities", "prediction", "web_search_options")
_UNSUPPORTED_COMPLETION = ("suffix", "logit_bias", "best_of")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def parse_chat_request(body: Any) -> ChatRequest:
    body = _object(body)
    _refuse(body, _UNSUPPORTED_CHAT)
    model = _model(body)
    logprobs = _optional_bool(body, "logprobs") or False
    top_logprobs = _optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    messages = _messages(body.get("messages"))
    tools = parse_tools(body.get("tools"))
    choice = parse_tool_choice(body.get("tool_choice"), tools)
    parallel = _optional_bool(body, "parallel_tool_calls")
    parallel = True if parallel is None else parallel
    format_grammar = parse_response_format(body.get("response_format"))
    grammar = tool_grammar(tools, choice, parallel) or format_grammar
    max_tokens = _optional_int(body, "max_completion_tokens", 1, MAX_TOKENS_CAP)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1, MAX_TOKENS_CAP)
    stream, include_usage = _stream(body)
    params = _sampling(body, max_tokens, grammar)
    if logprobs:
        params = replace(params, logprobs=top_logprobs or 0)
    return ChatRequest(
        model=model,
        messages=messages,
        params=params,
        stream=stream,
        include_usage=include_usage,
        n=_choices(body),
        logprobs=logprobs,
        keep_alive=parse_keep_alive(body.get("keep_alive")),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )


def chat_payload(req: ChatRequest, *, response_format: dict[str, Any] | None = None) -> dict[str, Any]:
    """``req`` as an OpenAI chat completions body (``parse_chat_request`` reads it back), for a
    server that takes OpenAI bodies (an external engine). A grammar is not carried: the
    server constrains its output from ``tools``/``tool_choice`` and ``response_format``."""
    params = req.params
    body: dict[str, Any] = {"model": req.model, "messages": [_message_json(m) for m in req.messages]}
    optional = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "seed": params.seed, "presence_penalty": params.presence_penalty or None,
                "frequency_penalty": params.frequency_penalty or None, "stop": list(params.stop) or None,
                "n": req.n if req.n != 1 else None, "response_format": response_format}
    body.update({name: value for name, value in optional.items() if value is not None})
    if req.logprobs:
        body["logprobs"] = True
        if params.logprobs:
            body["top_logprobs"] = params.logprobs
    if req.tools:
        body["tools"] = [tool.to_openai() for tool in req.tools]
        body["tool_choice"] = tool_choice_json(req.tool_choice)
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.stream:
        body["stream"] = True
        if req.include_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def _message_json(message: ChatMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        item["tool_calls"] = [call_json(call) for call in message.tool_calls]
    if message.tool_call_id is not None:
        item["tool_call_id"] = message.tool_call_id
    return item


def parse_completion_request(body: Any) -> CompletionRequest:
    body = _object(body)
    _refuse(body, _UNSUPPORTED_COMPLETION)
    logprobs = None if body.get("logprobs") is False else _optional_int(
        body, "logprobs", 0, MAX_COMPLETION_LOGPROBS
    )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: tuple[str, ...] = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > MAX_COMPLETION_PROMPTS:
            raise InvalidRequestError(
                f"at most {MAX_COMPLETION_PROMPTS} prompts per request", param="prompt"
            )
        prompts = tuple(prompt)
    else:
        raise InvalidRequestError(
            "'prompt' must be a string or a non-empty list of strings (token arrays are not supported)",
            param="prompt",
        )
    for prompt_text in prompts:
        _encodable(prompt_text, "prompt")
    max_tokens = _optional_int(body, "max_tokens", 1, MAX_TOKENS_CAP)
    stream, include_usage = _stream(body)
    if stream and len(prompts) > 1:
        raise InvalidRequestError("streaming supports a single prompt", param="prompt")
    params = _sampling(body, 16 if max_tokens is None else max_tokens)
    if logprobs is not None:
        params = replace(params, logprobs=logprobs)
    return CompletionRequest(
        model=_model(body),
        prompts=prompts,
        params=params,
        stream=stream,
        include_usage=include_usage,
        echo=_optional_bool(body, "echo") or False,
        n=_choices(body),
        keep_alive=parse_keep_alive(body.get("keep_alive")),
    )


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    body = _object(body)
    if body.get("dimensions") is not None:
        raise UnsupportedParameterError("'dimensions' is not supported", param="dimensions")
    value = body.get("input")
    if isinstance(value, str):
        inputs: tuple[str, ...] = (value,)
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = tuple(value)
    else:
        raise InvalidRequestError(
            "'input' must be a string or a non-empty list of strings (token arrays are not supported)",
            param="input",
        )
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequestError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
    if any(not text for text in inputs):
        raise InvalidRequestError("'input' must not contain empty strings", param="input")
    for text in inputs:
        _encodable(text, "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return EmbeddingRequest(model=_model(body), inputs=inputs, encoding_format=encoding,
                            keep_alive=parse_keep_alive(body.get("keep_alive")))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive``: seconds as a number, or a duration such as ``"5m"``, ``"1h30m"``,
    ``"300ms"``; negative keeps the model loaded for ever, 0 unloads it after the request."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = float(body) if body and body[-1].isdigit() else _duration(body)
        except ValueError:
            seconds = math.nan
        value = sign * seconds
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or not -KEEP_ALIVE_MAX_S <= value <= KEEP_ALIVE_MAX_S:  # also refuses NaN and huge ints
        raise InvalidRequestError(
            "'keep_alive' must be a number of seconds or a duration such as \"5m\" (negative: keep "
            "the model loaded; 0: unload it after this request)", param="keep_alive")
    return float(value)


def _duration(text: str) -> float:
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(text)
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


# --------------------------------------------------------------------------


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


def _refuse(body: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, [], {}):
            raise UnsupportedParameterError(f"'{name}' is not supported by this node", param=name)


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(f"'n' must be an integer from 1 to {MAX_CHOICES}", param="n")
    return int(n)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("'model' is required and must be a non-empty string", param="model")
    return _encodable(model, "model")


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        given = item.get("role")
        role = _ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            raise InvalidRequestError(
                f"{where}.role must be one of system, developer, user, assistant, tool (got {repr(given)[:40]})",
                param=f"{where}.role",
            )
        content = _content(item.get("content"), f"{where}.content")
        if role == "tool":
            call_id = item.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequestError(f"{where}.tool_call_id is required for a tool message",
                                          param=f"{where}.tool_call_id")
            out.append(ChatMessage(role="tool", content=content, tool_call_id=call_id))
        elif role == "assistant":
            calls = parse_tool_calls_field(item.get("tool_calls"), f"{where}.tool_calls")
            out.append(ChatMessage(role="assistant", content=content, tool_calls=calls))
        else:
            out.append(ChatMessage(role=role, content=content))  # type: ignore[arg-type]
    return tuple(link_tool_results(out))


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return _encodable(value, where)
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"{where}: only text content parts are supported", param=where
                )
            parts.append(part["text"])
        return _encodable("".join(parts), where)
    raise InvalidRequestError(f"{where} must be a string or a list of text parts", param=where)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _optional_bool(body, "stream") or False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequestError("'stream_options' must be an object", param="stream_options")
        usage = options.get("include_usage", False)
        if not isinstance(usage, bool):
            raise InvalidRequestError(
                "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage"
            )
        include_usage = usage
    return stream, include_usage


def _sampling(body: dict[str, Any], max_tokens: int | None, grammar: str | None = None) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
        stops = tuple(s for s in stop if s)
    else:
        raise InvalidRequestError("'stop' must be a string or a list of strings", param="stop")
    for text in stops:
        _encodable(text, "stop")
    temperature = _optional_number(body, "temperature", 0.0, 2.0)
    top_p = _optional_number(body, "top_p", 0.0, 1.0)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequestError("'seed' must be an integer", param="seed")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,  # None: the model's default
        top_p=top_p,
        presence_penalty=_optional_number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_optional_number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        stop=stops,
        seed=None if seed is None else int(seed) & 0x7FFFFFFF,
        grammar=grammar,
    )


def _encodable(text: str, where: str) -> str:
    """Text the engine can tokenize: no lone surrogates (``"\ud800"`` decodes from JSON but is not
    Unicode). The HTTP reader refuses them already; this covers the embedding library's calls."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{where} is not valid Unicode text (lone surrogate)", param=where,
                                  code="invalid_text") from None
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be an integer from {low} to {high}", param=name)
    return int(value)


def _optional_number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be a number", param=name)
    if isinstance(value, float) and not math.isfinite(value):  # an int of any size compares exactly
        raise InvalidRequestError(f"'{name}' must be a finite number", param=name)
    if not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be between {low:g} and {high:g}", param=name)
    return float(value)


def _optional_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be a boolean", param=name)
    return value
