"""An external engine: a real third-party OpenAI-compatible server (``llama_cpp.server`` on the
built-in model) behind a node, listed, streamed through with the openai SDK (chat, completions
and the Responses API), counted, and answered with a clean 503 when it goes away."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.responses import (
    FunctionToolParam,
    Response,
    ResponseCompletedEvent,
    ResponseIncompleteEvent,
)

from .conftest import NodeProcess, free_port, start_node_process


@pytest.fixture
def llama_cpp_server(default_model: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model), "--model_alias", "gemma-external",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "2"],
        stdout=(tmp_path / "server.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("llama_cpp.server did not start:\n" + (tmp_path / "server.log").read_text())
        yield process, port
    finally:
        process.kill()
        process.wait(10)


@pytest.mark.engine
async def test_an_external_server_is_listed_streamed_counted_and_its_failure_is_a_clean_503(
        llama_cpp_server: tuple[subprocess.Popen[bytes], int], tmp_path: Path) -> None:
    server, port = llama_cpp_server
    node: NodeProcess = start_node_process(tmp_path / "node", config_text=f"""
[models.sim]
engine = "simulated"

[[hub.external_engines]]
name = "llamacpp"
base_url = "http://127.0.0.1:{port}/v1"
models = ["gemma-external"]
max_concurrent = 1
health_interval = 1.0
""")
    try:
        client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
        listed = {m.id: m for m in (await client.models.list()).data}
        assert listed["gemma-external"].owned_by == "external:llamacpp" and "sim" in listed
        raw = await client.chat.completions.with_raw_response.create(
            model="gemma-external", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
            stream=True)
        assert raw.headers["X-DVAI-Served-By"] == "external:llamacpp"
        chunks = [c async for c in raw.parse() if c.choices]
        # the built-in base model ends its chat turn at once on llama_cpp.server's template: the
        # relay is judged on the stream's shape here, on text with the completion stream below
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length"), (chunks, node.output[-10:])
        stream = await client.completions.create(model="gemma-external", prompt="The colours of the rainbow are",
                                                 max_tokens=8, stream=True)
        assert "".join([c.choices[0].text async for c in stream if c.choices]).strip()
        whole = await client.completions.create(model="gemma-external", prompt="The sky is", max_tokens=5)
        assert whole.choices[0].text and whole.usage is not None and whole.usage.completion_tokens > 0
        deltas, whole_response = await _responses_streamed_and_whole(client)
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as session:
            async with session.get(node.root + "/v1/dvai/usage?days=1") as response:
                rows = (await response.json())["data"]
            assert sum(r["requests"] for r in rows if r["model"] == "gemma-external") == 5  # not the refused one
            assert sum(r["completionTokens"] for r in rows if r["model"] == "gemma-external") > 0
            async with session.get(node.root + "/v1/dvai/audit") as response:
                audited = [r for r in (await response.json())["data"] if r["modelServed"] == "gemma-external"]
            assert {r["servedBy"] for r in audited} == {"external:llamacpp"}
            # the streamed answer counted its text events; the whole one the engine's usage
            responses_rows = [r for r in audited if r["endpoint"] == "/v1/responses" and r["status"] == 200]
            assert sorted(r["completionTokens"] for r in responses_rows) == sorted(
                [len(deltas), whole_response.usage.output_tokens if whole_response.usage else -1])
            await _responses_stream_broken_by_the_engine(client, server)
            body = {"model": "gemma-external", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            async with session.post(node.base_url + "/chat/completions", json=body) as response:
                error = await response.json()
                assert response.status == 503 and error["error"]["code"] == "external_engine_unavailable"
                assert response.headers["Retry-After"]
            for streaming in (False, True):
                with pytest.raises(openai.APIStatusError) as refused:
                    await client.responses.create(model="gemma-external", input="hi", stream=streaming)
                assert refused.value.status_code == 503 and refused.value.code == "external_engine_unavailable"
            async with session.get(node.base_url + "/models") as response:
                assert response.status == 200
            # the node's own models are unaffected
            async with session.post(node.base_url + "/chat/completions", json={**body, "model": "sim"}) as response:
                assert response.status == 200
    finally:
        node.stop()
    assert "Traceback" not in "".join(node.output)


# (the base model answers a chat turn with text on llama_cpp.server when it has a system
# message: the request's instructions)
INSTRUCTIONS, ASK = "Answer in one word.", "The colours of the rainbow are"


async def _responses_streamed_and_whole(client: openai.AsyncOpenAI) -> tuple[list[str], Response]:
    """``/v1/responses`` for the external model, streamed (its named events) and not: the same text.
    First one the engine refuses (longer than its context): a clean 400 that leaves it up."""
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model="gemma-external", input="colour " * 700, max_output_tokens=8)
    assert refused.value.code == "external_engine_refused" and "context" in refused.value.message, refused.value
    raw = await client.responses.with_raw_response.create(
        model="gemma-external", instructions=INSTRUCTIONS, input=ASK, max_output_tokens=8, temperature=0, stream=True)
    assert raw.headers["X-DVAI-Served-By"] == "external:llamacpp"
    events = [event async for event in raw.parse()]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    last = events[-1]
    assert isinstance(last, (ResponseCompletedEvent, ResponseIncompleteEvent))
    final = last.response
    assert deltas and final.output_text == "".join(deltas) and final.model == "gemma-external"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    whole = await client.responses.create(model="gemma-external", instructions=INSTRUCTIONS, input=ASK,
                                          max_output_tokens=8, temperature=0)
    assert whole.output_text == final.output_text and whole.status == final.status
    assert whole.usage is not None and whole.usage.output_tokens > 0 and whole.usage.input_tokens > 0
    return deltas, whole


async def _responses_stream_broken_by_the_engine(client: openai.AsyncOpenAI,
                                                 server: subprocess.Popen[bytes]) -> None:
    """The engine dies mid-stream: the Responses stream ends with an ``error`` event."""
    stream = await client.responses.create(model="gemma-external", instructions="Answer at length.",
                                           input="Tell the story of the sea.", max_output_tokens=400,
                                           temperature=0, stream=True)
    kinds = []
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta" and server.poll() is None:
            server.kill()
            server.wait(10)
    assert "response.output_text.delta" in kinds and kinds[-1] == "error", kinds


# -- what a real server does not do on demand: tool calls, an HTTP error, a malformed answer ----


@pytest.fixture
async def scripted_server() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """A SCRIPTED OpenAI-compatible server (aiohttp, in the test): its answer depends on the last
    user message (``call`` streams a tool call, ``fail`` answers HTTP 500, ``garbage`` a JSON
    object that is no chat completion, ``garbled`` a stream whose second chunk is malformed). Yields its port and the chat bodies it received."""
    received: list[dict[str, Any]] = []

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        received.append(body)
        said = body["messages"][-1]["content"]
        if said == "fail":
            return web.json_response({"error": {"message": "out of memory", "type": "server_error"}}, status=500)
        if said == "garbage":
            return web.json_response({"object": "chat.completion", "oops": True})
        call = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
        if not body.get("stream"):
            return web.json_response({"id": "c0", "object": "chat.completion", "created": 1, "model": "scripted",
                                      "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                                          "role": "assistant", "content": None, "tool_calls": [call]}}],
                                      "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "scripted"}
        if said == "garbled":
            good = {**base, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
            bad = {**base, "choices": [{"index": 0, "delta": {"content": ["not", "text"]}}]}
            await response.write(f"data: {json.dumps(good)}\n\ndata: {json.dumps(bad)}\n\ndata: [DONE]\n\n".encode())
            await response.write_eof()
            return response
        for delta, finish in (({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}]}, None),
                              ({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}, None),
                              ({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}, None),
                              ({}, "tool_calls")):
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(f"data: {json.dumps(chunk)}\r\n\r\n".encode())
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        await response.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port, received
    finally:
        await runner.cleanup()


async def test_responses_through_a_scripted_external_server_tool_calls_and_its_errors(
        scripted_server: tuple[int, list[dict[str, Any]]], tmp_path: Path) -> None:
    port, received = scripted_server
    config = f"""
[models.sim]
engine = "simulated"

[[hub.external_engines]]
name = "scripted"
base_url = "http://127.0.0.1:{port}/v1"
models = ["scripted"]
"""
    # started off the loop: the scripted server (on this loop) answers the node's first health check
    node = await asyncio.to_thread(start_node_process, tmp_path / "node", config_text=config)
    weather: FunctionToolParam = {"type": "function", "name": "get_weather", "strict": False, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    try:
        client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
        stream = await client.responses.create(model="scripted", input="call", tools=[weather],
                                               tool_choice="required", instructions="Use tools.", stream=True)
        events = [event async for event in stream]
        last = events[-1]
        assert isinstance(last, ResponseCompletedEvent), [e.type for e in events]
        [call] = last.response.output
        assert call.type == "function_call" and (call.call_id, call.name, call.arguments) == (
            "call_9", "get_weather", '{"city":"Oslo"}')
        assert last.response.usage is not None and last.response.usage.output_tokens == 7
        sent = received[-1]  # the engine got the Responses request as a chat body
        assert sent["messages"] == [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "call"}]
        assert sent["tool_choice"] == "required" and sent["tools"][0]["function"]["name"] == "get_weather"
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        for said, status, code in (("fail", 502, "external_engine_error"), ("garbage", 502, "external_engine_bad_answer")):
            with pytest.raises(openai.APIStatusError) as failed:
                await client.responses.create(model="scripted", input=said)
            assert (failed.value.status_code, failed.value.code) == (status, code), failed.value
        # a malformed chunk mid-stream ends the stream with an error event (no traceback, no 500)
        garbled = await client.responses.create(model="scripted", input="garbled", stream=True)
        seen = [event async for event in garbled]
        kinds = [event.type for event in seen]
        assert "response.output_text.delta" in kinds and kinds[-1] == "error", kinds
        assert "malformed" in str(getattr(seen[-1], "message", "")), seen[-1]
        # an HTTP error does not mark the engine down: it still serves
        again = await client.responses.create(model="scripted", input="call", tools=[weather])
        [item] = again.output
        assert item.type == "function_call" and (item.name, item.status) == ("get_weather", "completed")
        assert again.usage is not None and (again.usage.input_tokens, again.usage.output_tokens) == (11, 7)
    finally:
        node.stop()
    assert "Traceback" not in "".join(node.output)


@pytest.mark.parametrize(("chunk", "valid"), [
    ({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}, True),
    ({"choices": [], "usage": {"prompt_tokens": 1}}, True),
    ({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]}, True),
    ({"choices": [{"delta": {}, "finish_reason": "stop"}], "model": "m"}, True),
    (["not", "a", "chunk"], False),
    ({"choices": "all of them"}, False),
    ({"choices": [None]}, False),
    ({"choices": [{"delta": "text"}]}, False),
    ({"choices": [{"delta": {"content": 7}}]}, False),
    ({"choices": [{"delta": {}, "finish_reason": 1}]}, False),
    ({"choices": [{"delta": {"tool_calls": {"index": 0}}}]}, False),
    ({"choices": [{"delta": {"tool_calls": [{"index": "0"}]}}]}, False),
    ({"choices": [{"delta": {"tool_calls": [{"function": {"name": ["x"]}}]}}]}, False),
    ({"choices": [], "usage": [1, 2]}, False),
    ({"choices": [], "model": 3}, False),
])
def test_a_relayed_chunk_is_checked_before_it_is_translated(chunk: object, valid: bool) -> None:
    from node.api.responses import is_chat_chunk

    assert is_chat_chunk(chunk) is valid
