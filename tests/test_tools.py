"""Tool rendering, call parsing (whole and streamed) and request parsing, on plain data."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.api.responses import ResponsesStream, response_from_chat
from node.api.responses_parsing import parse_responses_request
from node.api.schemas import chat_payload, parse_chat_request
from node.api.tool_params import chat_response_format
from node.common.errors import InvalidRequestError
from node.engine.base import ChatMessage, ToolCall
from node.engine.tool_output import stream_delta
from node.engine.tools import (
    FunctionTool,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    ToolCallStream,
    fallback_messages,
    parse_tool_calls,
    template_knows_tools,
    template_messages,
)

WEATHER = FunctionTool("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}})
TIME = FunctionTool("get_time", None, {"type": "object", "properties": {}})
TOOLS = (WEATHER, TIME)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "",
         [("get_weather", {"city": "Paris"})]),
        ('Let me check.\n<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>\n'
         '<tool_call>{"name":"get_time","arguments":{}}</tool_call>', "Let me check.",
         [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
        ('<tool_call>{"name": "get_time", "arguments": "{}"}', "", [("get_time", {})]),  # unclosed, string args
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]', "",
         [("get_weather", {"city": "Rome"})]),
        ('{"name": "get_weather", "parameters": {"city": "Nice"}}', "", [("get_weather", {"city": "Nice"})]),
        ('```json\n{"name": "get_time", "arguments": {}}\n```', "", [("get_time", {})]),
        ('{"name": "unknown", "arguments": {}}', '{"name": "unknown", "arguments": {}}', []),
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        ("Just text.", "Just text.", []),
    ],
)
def test_parse_tool_calls(text: str, content: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    found_content, found = parse_tool_calls(text, TOOLS)
    assert found_content == content
    assert [(c.name, json.loads(c.arguments)) for c in found] == calls
    assert len({c.id for c in found}) == len(found)


def stream_all(text: str, pieces: list[int]) -> tuple[str, list[tuple[str, str]], list[Any]]:
    stream = ToolCallStream(TOOLS)
    events: list[Any] = []
    position = 0
    for size in pieces:
        events += stream.feed(text[position:position + size])
        position += size
    events += stream.feed(text[position:])
    events += stream.finish()
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ToolCallStart):
            calls[event.index] = [event.name, ""]
        elif isinstance(event, ToolArgumentsDelta):
            calls[event.index][1] += event.text
    return content, [(n, a) for n, a in calls.values()], events


SAMPLES = [
    'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Pa\\"ris}"}}</tool_call> done',
    '<tool_call>{"name":"get_weather","arguments":{"city":"A"}}</tool_call>\n<tool_call>{"name":"get_time",'
    '"arguments":{}}</tool_call>',
    '<tool_call>{"arguments": {"city": "x"}, "name": "get_weather"}</tool_call>',
    '{"name": "get_time", "arguments": {}}',
    "No call here, only <tool text and a < sign.",
    "<tool_call>broken",
]


@pytest.mark.parametrize("text", SAMPLES)
@given(cuts=st.lists(st.integers(min_value=0, max_value=7), max_size=40))
def test_stream_matches_whole_parse_however_it_is_cut(text: str, cuts: list[int]) -> None:
    content, calls, _ = stream_all(text, cuts)
    whole_content, whole_calls = parse_tool_calls(text, TOOLS)
    assert [(n, json.loads(a)) for n, a in calls] == [(c.name, json.loads(c.arguments)) for c in whole_calls]
    if whole_calls:
        assert content.strip() == whole_content
    else:
        assert content == text


def test_stream_sends_arguments_as_they_come() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    _, calls, events = stream_all(text, [1] * len(text))
    pieces = [e for e in events if isinstance(e, ToolArgumentsDelta)]
    assert len(pieces) > 5
    assert calls == [("get_weather", '{"city": "Paris"}')]
    start = next(e for e in events if isinstance(e, ToolCallStart))
    assert stream_delta(start) == {"tool_calls": [{"index": 0, "id": start.id, "type": "function",
                                                   "function": {"name": "get_weather", "arguments": ""}}]}
    assert stream_delta(pieces[0]) == {"tool_calls": [{"index": 0, "function": {"arguments": pieces[0].text}}]}
    assert stream_delta(ToolArgumentsDelta(1, "x"), parallel=False) is None


def test_fallback_rendering_carries_tools_calls_and_results() -> None:
    call = ToolCall("call_1", "get_weather", '{"city":"Paris"}')
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Weather?"),
                ChatMessage("assistant", "", tool_calls=(call,)),
                ChatMessage("tool", "21 C", tool_call_id="call_1", name="get_weather")]
    plain = fallback_messages(messages, TOOLS)
    assert [m.role for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0].content.startswith("Be brief.") and '"name":"get_weather"' in plain[0].content
    assert plain[2].content == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    assert plain[3].content == '<tool_response>{"name":"get_weather","content":"21 C"}</tool_response>'
    assert parse_tool_calls(plain[2].content, TOOLS)[1][0].arguments == call.arguments
    native = template_messages(messages)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[3] == {"role": "tool", "content": "21 C", "tool_call_id": "call_1", "name": "get_weather"}
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_knows_tools("{% for message in messages %}{{ message.content }}{% endfor %}")


# -- request parsing -------------------------------------------------------------------

CHAT_TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_chat_request_with_tools_history_and_forced_call() -> None:
    request = parse_chat_request({
        "model": "m", "tools": CHAT_TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_9", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "4 C"},
        ]})
    assert request.tool_choice.mode == "required" and not request.parallel_tool_calls
    assert request.messages[1].tool_calls == (ToolCall("call_9", "get_weather", '{"city":"Oslo"}'),)
    assert request.messages[2].name == "get_weather"
    grammar = request.params.grammar
    assert grammar is not None and "<tool_call>" in grammar and '\\"get_weather\\"' in grammar


def test_chat_request_json_schema_sets_the_grammar_and_none_keeps_tools_out() -> None:
    request = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                  "tools": CHAT_TOOLS, "tool_choice": "none",
                                  "response_format": {"type": "json_schema", "json_schema": {
                                      "name": "n", "schema": {"type": "object", "properties": {
                                          "a": {"type": "integer"}}}}}})
    assert request.tool_choice.mode == "none"
    assert request.params.grammar is not None and "integer" in request.params.grammar


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": CHAT_TOOLS * 2}, "tools[1]"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools[0].function.parameters.type"),
        ({"tools": CHAT_TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                                            "function": {"name": "f",
                                                                                         "arguments": "[1]"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
    ],
)
def test_chat_request_refusals_name_the_field(body: dict[str, Any], param: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(InvalidRequestError) as caught:
        parse_chat_request(full)
    assert caught.value.param == param


def test_responses_request_becomes_a_chat_request() -> None:
    request = parse_responses_request({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 50, "stream": True,
        "tools": [{"type": "function", "name": "get_weather", "parameters": CHAT_TOOLS[0]["function"]["parameters"]}],
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "4 C"},
        ]})
    chat = request.chat
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    assert chat.messages[3].name == "get_weather" and chat.params.max_tokens == 50
    assert chat.stream and chat.include_usage and chat.tool_choice.mode == "auto"


def test_a_responses_request_as_the_chat_body_an_external_engine_gets_reads_back_the_same() -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    for extra in ({"tools": [{"type": "function", "name": "get_weather",
                              "parameters": CHAT_TOOLS[0]["function"]["parameters"]}],
                   "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False},
                  {"text": {"format": {"type": "json_schema", "name": "colour", "schema": schema}}}):
        request = parse_responses_request({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 50, "stream": True, "temperature": 0.2,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": '{"city":"Oslo"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "4 C"},
            ], **extra})
        body = chat_payload(request.chat, response_format=chat_response_format(request.text_format))
        assert body["stream_options"] == {"include_usage": True}
        back = parse_chat_request(json.loads(json.dumps(body)))
        # the same request, up to the tool message's name (chat bodies do not carry it)
        assert back.messages[:3] == request.chat.messages[:3]
        assert back.messages[3].content == "4 C" and back.messages[3].tool_call_id == "call_1"
        assert (back.params, back.tools, back.tool_choice, back.parallel_tool_calls, back.stream) == (
            request.chat.params, request.chat.tools, request.chat.tool_choice, request.chat.parallel_tool_calls,
            True)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_responses_stream_translation() -> None:
    request = parse_responses_request({"model": "m", "input": "hi"})
    stream = ResponsesStream(request, "resp_1", 1, "m")
    events = stream.start()
    events += stream.feed(chat_chunk({"role": "assistant", "content": "Hel"}))
    events += stream.feed(chat_chunk({"content": "lo"}))
    events += stream.feed(chat_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                      "function": {"name": "f", "arguments": ""}}]}))
    events += stream.feed(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}))
    events += stream.feed(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}))
    events += stream.feed(chat_chunk({}, "tool_calls"))
    events += stream.feed({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    events += stream.finish()
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["output"][1] == {"type": "function_call", "id": final["output"][1]["id"], "call_id": "call_1",
                                  "name": "f", "arguments": '{"a":1}', "status": "completed"}
    assert final["usage"]["input_tokens"] == 3 and final["usage"]["output_tokens"] == 4
    assert events[2]["item"]["content"] == []  # the snapshot at the time, not the final item


def test_response_from_chat_marks_length_incomplete() -> None:
    request = parse_responses_request({"model": "m", "input": "hi", "max_output_tokens": 2})
    body = response_from_chat(request, {
        "created": 5, "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "choices": [{"message": {"role": "assistant", "content": "ab"}, "finish_reason": "length"}]})
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["text"] == "ab" and body["store"] is False
