"""End to end: a real `dvai-node serve` process, the real engine and default model, real clients."""

from __future__ import annotations

import asyncio
import json
import math
import time

import aiohttp
import openai
import pytest

from .conftest import NodeProcess

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "Name three colours."}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def client(node: NodeProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0, timeout=60)


async def test_chat_non_stream(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        result = await api.chat.completions.create(
            model="gemma3-270m", messages=CHAT, max_tokens=12, temperature=0  # type: ignore[arg-type]
        )
    choice = result.choices[0]
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.model == "gemma3-270m"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert result.usage is not None
    assert result.usage.completion_tokens <= 12
    assert result.usage.prompt_tokens > 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert abs(result.created - time.time()) < 120


async def test_chat_stream_with_usage(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        stream = await api.chat.completions.create(
            model="gemma3-270m", messages=CHAT, max_tokens=10, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content_chunks, "no text streamed"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == len(content_chunks) or usage.completion_tokens >= len(content_chunks)
    assert len({c.id for c in chunks}) == 1


async def test_stream_matches_non_stream(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        whole = await api.completions.create(
            model="gemma3-270m", prompt=COUNTING, max_tokens=16, temperature=0
        )
        stream = await api.completions.create(
            model="gemma3-270m", prompt=COUNTING, max_tokens=16, temperature=0, stream=True
        )
        parts = [c.choices[0].text async for c in stream if c.choices]
    assert whole.object == "text_completion"
    assert "".join(parts) == whole.choices[0].text
    assert "11" in whole.choices[0].text


async def test_completion_list_prompt(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        result = await api.completions.create(
            model="gemma3-270m", prompt=["The sky is", "Water is"], max_tokens=4, temperature=0
        )
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.text for c in result.choices)
    assert result.usage is not None and result.usage.completion_tokens <= 8


async def test_embeddings(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        result = await api.embeddings.create(model="gemma-embed", input=["a cat", "a kitten", "tax law"])
        single = await api.embeddings.create(model="gemma-embed", input="a cat", encoding_format="float")
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100
    for vector in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-3)
    assert single.data[0].embedding == pytest.approx(vectors[0], abs=1e-4)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert result.usage.prompt_tokens > 0


async def test_embeddings_on_chat_model_says_how_to_enable(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        with pytest.raises(openai.BadRequestError) as caught:
            await api.embeddings.create(model="gemma3-270m", input="x")
    assert "embedding = true" in str(caught.value)


async def test_models_list(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        models = await api.models.list()
    by_id = {m.id: m for m in models.data}
    assert set(by_id) == {"gemma3-270m", "gemma-embed"}
    chat = by_id["gemma3-270m"].model_dump()
    assert chat["owned_by"] and chat["context_length"] == 4096
    assert chat["serves"] == ["chat", "completion"]
    assert by_id["gemma-embed"].model_dump()["serves"] == ["embedding"]


async def test_two_concurrent_streams_complete_in_full(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        reference = await api.completions.create(model="gemma3-270m", prompt=COUNTING, max_tokens=24,
                                                 temperature=0)

        async def one() -> tuple[str, str | None]:
            stream = await api.completions.create(
                model="gemma3-270m", prompt=COUNTING, max_tokens=24, temperature=0, stream=True
            )
            text, finish = [], None
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
            return "".join(text), finish

        results = await asyncio.gather(one(), one())
    for text, finish in results:
        assert text == reference.choices[0].text
        assert finish == reference.choices[0].finish_reason


async def test_client_disconnect_frees_the_model(real_node: NodeProcess) -> None:
    body = {"model": "gemma3-270m", "prompt": COUNTING, "max_tokens": 3000, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(real_node.base_url + "/completions", json=body)
        assert response.status == 200
        await response.content.readline()  # the first token has been produced
        response.close()  # the client goes away mid-generation
        left = time.monotonic()
        started = time.monotonic()
        follow_up = await session.post(
            real_node.base_url + "/completions",
            json={"model": "gemma3-270m", "prompt": "Hello", "max_tokens": 2, "temperature": 0},
        )
        assert follow_up.status == 200
        await follow_up.json()
        # A 3000-token generation takes over a minute here; a freed model answers in well under 5 s.
        assert time.monotonic() - started < 5.0, "the abandoned generation kept the model busy"
        health = await (await session.get(real_node.root + "/v1/dvai/health")).json()
        assert health["models"][0]["queueDepth"] == 0
        assert time.monotonic() - left < 10


async def test_queue_overflow_gives_503_with_retry_after(tmp_path, default_model) -> None:  # noqa: ANN001
    from .conftest import start_node_process

    node = start_node_process(
        tmp_path / "q", config_text="[models.gemma3-270m]\nqueue_depth = 1\nparallel = 1\n"
    )
    long_body = {"model": "gemma3-270m", "prompt": COUNTING, "max_tokens": 400, "temperature": 0,
                 "stream": True}
    try:
        async with aiohttp.ClientSession() as session:
            running = await session.post(node.base_url + "/completions", json=long_body)
            await running.content.readline()
            waiting = asyncio.create_task(session.post(node.base_url + "/completions", json=long_body))
            for _ in range(100):
                health = await (await session.get(node.root + "/v1/dvai/health")).json()
                if health["models"][0]["queueDepth"] == 2:
                    break
                await asyncio.sleep(0.02)
            refused = await session.post(node.base_url + "/completions", json=long_body)
            assert refused.status == 503
            assert int(refused.headers["Retry-After"]) >= 1
            error = (await refused.json())["error"]
            assert error["code"] == "queue_full" and error["type"] and "queue" in error["message"]
            running.close()
            waiting.cancel()
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/chat/completions", b"{not json", 400, None),
        ("/chat/completions", b"[1, 2]", 400, None),
        ("/chat/completions", b"", 400, None),
        ("/chat/completions", json.dumps({"model": "gemma3-270m", "messages": "hi"}).encode(), 400, "messages"),
        ("/chat/completions", json.dumps({"model": 7, "messages": CHAT}).encode(), 400, "model"),
        ("/chat/completions", json.dumps({"model": "gemma3-270m", "messages": CHAT, "max_tokens": "9"}).encode(),
         400, "max_tokens"),
        ("/chat/completions", json.dumps({"model": "gemma3-270m", "messages": CHAT, "temperature": 9}).encode(),
         400, "temperature"),
        ("/chat/completions", json.dumps({"model": "gemma3-270m", "messages": CHAT, "n": 17}).encode(), 400, "n"),
        ("/chat/completions", json.dumps({"model": "gemma3-270m", "messages": CHAT,
                                          "tools": [{"type": "function"}]}).encode(), 400, "tools[0].function"),
        ("/chat/completions", json.dumps({"model": "gemma3-270m", "messages": [{"role": "robot",
                                                                                 "content": "x"}]}).encode(),
         400, "messages[0].role"),
        ("/chat/completions", json.dumps({"model": "no-such-model", "messages": CHAT}).encode(), 404, "model"),
        ("/completions", json.dumps({"model": "gemma3-270m", "prompt": [1, 2, 3]}).encode(), 400, "prompt"),
        ("/embeddings", json.dumps({"model": "gemma-embed", "input": []}).encode(), 400, "input"),
        ("/embeddings", json.dumps({"model": "gemma-embed", "input": "x", "encoding_format": "hex"}).encode(),
         400, "encoding_format"),
    ],
)
async def test_bad_input_gets_openai_shaped_4xx(
    real_node: NodeProcess, path: str, payload: bytes, status: int, param: str | None
) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(real_node.base_url + path, data=payload,
                                      headers={"Content-Type": "application/json"})
        body = await response.json()
    assert response.status == status, body
    assert set(body["error"]) >= {"message", "type", "code", "param"}
    assert body["error"]["param"] == param
    assert "Traceback" not in body["error"]["message"]


async def test_oversize_body_wrong_method_unknown_path(real_node: NodeProcess) -> None:
    async with aiohttp.ClientSession() as session:
        big = await session.post(real_node.base_url + "/chat/completions", data=b"x" * (9 * 1024 * 1024))
        assert big.status == 413
        assert (await big.json())["error"]["code"] == "payload_too_large"
        wrong = await session.get(real_node.base_url + "/chat/completions")
        assert wrong.status == 405
        assert (await wrong.json())["error"]["code"] == "method_not_allowed"
        missing = await session.get(real_node.base_url + "/nothing-here")
        assert missing.status == 404
        assert (await missing.json())["error"]["type"] == "invalid_request_error"
        # The node is unharmed: a good request still works.
        ok = await session.post(real_node.base_url + "/completions",
                                json={"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 2})
        assert ok.status == 200


async def test_health_reports_models_and_identity(real_node: NodeProcess) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.get(real_node.root + "/v1/dvai/health")
        body = await response.json()
    assert response.status == 200
    assert body["status"] == "ok"
    assert body["deviceId"].startswith("dv") and len(body["deviceId"]) == 34
    assert {m["id"] for m in body["models"]} == {"gemma3-270m", "gemma-embed"}
    assert all(m["loaded"] and m["queueDepth"] >= 0 for m in body["models"])
    assert body["uptimeS"] > 0


async def test_stream_carries_request_id_and_context_errors_name_the_field(real_node: NodeProcess) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(real_node.base_url + "/completions", headers={"X-Request-Id": "req-42"},
                                      json={"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 2, "stream": True})
        await response.read()
        assert response.headers["X-Request-Id"] == "req-42"
        huge = "word " * 5000  # beyond the 4096-token context
        too_long = await session.post(real_node.base_url + "/completions",
                                      json={"model": "gemma3-270m", "prompt": huge, "max_tokens": 2})
        error = (await too_long.json())["error"]
        assert too_long.status == 400 and error["code"] == "context_length_exceeded"
        assert error["param"] == "prompt"
        chat = await session.post(real_node.base_url + "/chat/completions",
                                  json={"model": "gemma3-270m", "max_tokens": 2,
                                        "messages": [{"role": "user", "content": huge}]})
        assert (await chat.json())["error"]["param"] == "messages"


async def test_seed_makes_sampling_repeatable(real_node: NodeProcess) -> None:
    async with client(real_node) as api:
        runs = [await api.completions.create(model="gemma3-270m", prompt="Once upon a time", max_tokens=12,
                                             temperature=1.0, seed=1234) for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text
