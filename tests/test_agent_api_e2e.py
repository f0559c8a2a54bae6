"""Tools, structured outputs and the Responses API: the unmodified openai SDK against a real node.

The default model is a tiny base model: what these tests assert is what the grammar guarantees on
any model (a forced call is a call to a listed function whose arguments match its schema; a
structured output parses and validates), plus the exact OpenAI shapes around it.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import aiohttp
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from .conftest import NodeProcess

pytestmark = pytest.mark.engine

MODEL = "gemma3-270m"
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET", "PST"]},
                   "hour24": {"type": "boolean"}},
    "required": ["timezone"],
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER_SCHEMA, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                      "parameters": TIME_SCHEMA}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def client(node: NodeProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0, timeout=120)


def check_call(name: str, arguments: str) -> dict[str, Any]:
    assert name in SCHEMAS
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, SCHEMAS[name])
    return parsed  # type: ignore[no-any-return]


# -- chat: tools ---------------------------------------------------------------------


async def test_tool_round_trip_required_then_final_answer(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        first = await api.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
            temperature=0, max_tokens=120)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls
        assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
        assert len({c.id for c in calls}) == len(calls)
        for call in calls:
            check_call(call.function.name, call.function.arguments)
        history = [*ASK, choice.message.model_dump(exclude_none=True)]
        history += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature_c": 21})}
                    for c in calls]
        final = await api.chat.completions.create(
            model=MODEL, messages=history, tools=TOOLS, tool_choice="none",  # type: ignore[arg-type]
            temperature=0, max_tokens=24)
    answer = final.choices[0]
    assert answer.message.tool_calls is None
    assert isinstance(answer.message.content, str) and answer.message.content.strip()
    assert answer.finish_reason in ("stop", "length")
    assert final.usage is not None and first.usage is not None
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


async def test_named_tool_choice_forces_that_function(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        result = await api.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, temperature=0.9, seed=7, max_tokens=80,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_time"
    check_call("get_time", call.function.arguments)


async def test_streamed_tool_call_deltas_reassemble(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        stream = await api.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,  # type: ignore[arg-type]
            temperature=0, max_tokens=120, stream=True)
        chunks = [chunk async for chunk in stream]
        async with api.chat.completions.stream(
                model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                parallel_tool_calls=False, temperature=0, max_tokens=120) as helper:
            final = await helper.get_final_completion()
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert chunks[0].choices[0].delta.role == "assistant"
    head = deltas[0].tool_calls[0]  # type: ignore[index]
    assert head.index == 0 and head.id and head.type == "function" and head.function is not None
    assert head.function.name == "get_weather" or head.function.name == "get_time"
    pieces = [d.tool_calls[0].function.arguments for d in deltas[1:]]  # type: ignore[index, union-attr]
    assert len(pieces) > 1, "the arguments should stream in several pieces"
    assert all(d.tool_calls[0].id is None for d in deltas[1:])  # type: ignore[index]
    check_call(head.function.name, "".join(p or "" for p in pieces))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert check_call(call.function.name, call.function.arguments) == json.loads("".join(p or "" for p in pieces))


async def test_auto_tool_choice_answers_in_text_or_a_valid_call(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        result = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS,  # type: ignore[arg-type]
            temperature=0, max_tokens=20)
    choice = result.choices[0]
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call.function.name, call.function.arguments)
    else:
        assert choice.message.tool_calls is None and isinstance(choice.message.content, str)


# -- chat: structured outputs ----------------------------------------------------------


class Address(BaseModel):
    city: str = Field(max_length=24)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    colour: Literal["red", "green", "blue"]
    nickname: str | None = Field(max_length=12)
    address: Address


async def test_parse_with_a_pydantic_model(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        result = await api.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "Invent a person who lives in Lyon."}],
            response_format=Person, temperature=0, max_tokens=200)
    message = result.choices[0].message
    assert result.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)
    assert 0 <= message.parsed.age <= 120 and len(message.parsed.address.zip_code) == 5


STRUCTURED: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 16},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}}, "required": ["name", "address"]}},
     "required": ["person"]},
    {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer", "minimum": -10,
                                                                            "maximum": 10},
                                                 "minItems": 1, "maxItems": 5}}, "required": ["values"]},
    {"type": "object", "properties": {"mood": {"type": "string", "enum": ["happy", "sad", "calm"]}},
     "required": ["mood"]},
    {"type": "object", "properties": {"probability": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["probability"]},
    {"type": "object", "properties": {"score": {"type": "number", "exclusiveMinimum": 0,
                                                "exclusiveMaximum": 100}}, "required": ["score"]},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                      "note": {"type": "string", "maxLength": 10},
                                      "flag": {"type": "boolean"}}, "required": ["id"]},
    {"type": "object", "properties": {"middle_name": {"type": ["string", "null"], "maxLength": 10},
                                      "verified": {"type": "boolean"}},
     "required": ["middle_name", "verified"]},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                           {"type": "string", "maxLength": 8}]}},
     "required": ["answer"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"]},
    {"type": "object", "properties": {"version": {"const": "v1"}, "level": {"type": "integer", "minimum": 1,
                                                                             "maximum": 3}},
     "required": ["version", "level"]},
    {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -100, "maximum": 100},
        "y": {"type": "integer", "minimum": -100, "maximum": 100}}, "required": ["x", "y"]}},
     "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    {"type": "object", "properties": {"request_id": {"type": "string", "format": "uuid"}},
     "required": ["request_id"]},
    {"type": "object", "properties": {"temperature": {"type": "integer", "minimum": -50, "maximum": -10}},
     "required": ["temperature"]},
    {"type": "object", "properties": {"grid": {"type": "array", "maxItems": 3, "items": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "boolean"}}}}, "required": ["grid"]},
    {"type": "object", "properties": {"choice": {"enum": [1, "two", None, True]}}, "required": ["choice"]},
    {"type": "object", "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 8}},
     "required": ["code"]},
    {"type": "object", "properties": {"population": {"type": "integer", "minimum": 1000, "maximum": 99999}},
     "required": ["population"]},
    {"type": "object", "properties": {"ratio": {"type": "number"}, "count": {"type": "integer"}},
     "required": ["ratio", "count"]},
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 5},
                                      "c": {"type": "boolean"}}},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                      "price": {"type": "number", "minimum": -5.5, "maximum": 12.25}},
     "required": ["when", "price"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {
        "type": "string", "enum": ["a", "b", "c"]}, "maxItems": 4}}, "required": ["tags"],
     "additionalProperties": False},
]


@pytest.mark.parametrize("index", range(len(STRUCTURED)))
async def test_structured_output_validates(real_node: NodeProcess, index: int) -> None:
    schema = STRUCTURED[index]
    async with client(real_node) as api:
        result = await api.chat.completions.create(
            model=MODEL, temperature=1.0, seed=index, max_tokens=300,
            messages=[{"role": "user", "content": "Fill in the JSON document."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema,
                                                                    "strict": True}})
    choice = result.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    document = json.loads(choice.message.content or "")
    jsonschema.validate(document, schema, format_checker=jsonschema.FormatChecker())


async def test_json_object_mode_gives_an_object(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        result = await api.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=200, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Give a JSON object with a colour."}])
    choice = result.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content or ""), dict)


# -- bad input -------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]}, "tools[0].function.parameters.properties.a.type"),
    ("/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name"),
    ("/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/chat/completions", {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[1].tool_call_id"),
    ("/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "object", "patternProperties": {}}}}}}]},
     "tools[0].function.parameters.properties.a.patternProperties"),
    ("/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}}}},
     "response_format.json_schema.schema.properties.n.multipleOf"),
    ("/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "oneOf": [{"type": "string"}, {"type": "integer"}]}}}}, "response_format.json_schema.schema.oneOf"),
    ("/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/responses", {"input": "hi", "store": True}, "store"),
    ("/responses", {"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ("/responses", {"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]},
     "input[0].call_id"),
    ("/responses", {"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ("/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "string", "format": "email"}}}}, "text.format.schema.format"),
]


async def test_bad_tool_and_schema_input_is_refused_before_the_engine(real_node: NodeProcess) -> None:
    """Each bad request gets a 400 naming the field while a long generation holds the model:
    it never queued behind it, so it never reached the engine."""
    busy = {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 2000, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        running = await session.post(real_node.base_url + "/completions", json=busy)
        await running.content.readline()
        try:
            for path, extra, param in BAD_REQUESTS:
                body = {"model": MODEL, "messages": ASK, **extra}
                if path == "/responses":
                    body.pop("messages")
                started = time.monotonic()
                response = await session.post(real_node.base_url + path, json=body)
                error = (await response.json())["error"]
                assert response.status == 400, (param, error)
                assert error["param"] == param, error
                assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
                assert time.monotonic() - started < 2.0
            health = await (await session.get(real_node.root + "/v1/dvai/health")).json()
            depth = {m["id"]: m["queueDepth"] for m in health["models"]}
            assert depth[MODEL] == 1  # only the long generation
        finally:
            running.close()
    await asyncio.sleep(0.2)


# -- the Responses API -------------------------------------------------------------------

RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
                  "parameters": WEATHER_SCHEMA, "strict": True}


async def test_responses_create_text(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        response = await api.responses.create(model=MODEL, input="Name three colours.",
                                              instructions="Answer briefly.", max_output_tokens=12,
                                              temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output[0].type == "message"
    assert response.output_text.strip()
    assert response.usage is not None and 0 < response.usage.output_tokens <= 12
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"


async def test_responses_function_tool_round_trip(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        first = await api.responses.create(model=MODEL, input="Weather in Oslo?", tools=[RESPONSES_TOOL],  # type: ignore[list-item]
                                           tool_choice="required", temperature=0, max_output_tokens=100)
        calls = [item for item in first.output if item.type == "function_call"]
        assert calls, first.output
        for call in calls:
            check_call(call.name, call.arguments)
            assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        follow_up: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}, *first.output]
        follow_up += [{"type": "function_call_output", "call_id": c.call_id, "output": '{"temperature_c": 4}'}
                      for c in calls]
        final = await api.responses.create(model=MODEL, input=follow_up, tools=[RESPONSES_TOOL],  # type: ignore[list-item]
                                           tool_choice="none", temperature=0, max_output_tokens=16)
    assert final.output_text.strip()
    assert all(item.type == "message" for item in final.output)


async def test_responses_json_schema_format(real_node: NodeProcess) -> None:
    schema = STRUCTURED[1]
    async with client(real_node) as api:
        response = await api.responses.create(
            model=MODEL, input="Invent a person.", temperature=0, max_output_tokens=200,
            text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)


async def test_responses_stream_text(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        async with api.responses.stream(model=MODEL, input="Count: one, two,", max_output_tokens=10,
                                        temperature=0) as stream:
            events = [event async for event in stream]
            if events[-1].type == "response.completed":
                await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    # Cut by max_output_tokens, the stream ends with response.incomplete (as OpenAI's does).
    assert kinds[-1] in ("response.completed", "response.incomplete")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == kinds[-1].split(".")[1]
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert text and final.output_text == text
    assert final.usage is not None and final.usage.output_tokens <= 10


async def test_responses_stream_function_call(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        async with api.responses.stream(model=MODEL, input="Weather in Rome?", tools=[RESPONSES_TOOL],  # type: ignore[list-item]
                                        tool_choice="required", parallel_tool_calls=False,
                                        temperature=0, max_output_tokens=100) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds.count("response.function_call_arguments.delta") > 1
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) == 1
    check_call(calls[0].name, calls[0].arguments)


# -- /v1/models ---------------------------------------------------------------------------


async def test_models_say_what_they_support(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        models = {m.id: m.model_dump() for m in (await api.models.list()).data}
    assert {"tools", "structured_outputs", "responses", "chat"} <= set(models[MODEL]["features"])
    assert models["gemma-embed"]["features"] == ["embeddings"]


# -- the API reference's examples ----------------------------------------------------------

DOCS_API = Path(__file__).resolve().parent.parent / "docs" / "api.md"
DOC_URL = "http://127.0.0.1:38883/v1"


def doc_examples() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", DOCS_API.read_text(), re.S | re.M)
    return [b for b in blocks if DOC_URL in b]


def test_the_reference_has_runnable_examples() -> None:
    assert len(doc_examples()) >= 3


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_docs_examples_run(real_node: NodeProcess, index: int) -> None:
    code = doc_examples()[index].replace(DOC_URL, real_node.base_url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()
