"""The chat-completion interceptor and model substitution on a real node (in-process, HTTP on
loopback, SIMULATED engines: these are about routing a request, not generating it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from node import Node, load_config
from node.common.errors import PermissionDeniedError
from node.hub.interceptor import InterceptContext, InterceptedResponse


def config(tmp_path: Path, **hub: Any) -> Any:
    return load_config(env={}, overrides={
        "state_dir": str(tmp_path), "http_base_port": 0,
        "models": {"qwen2.5:7b-instruct": {"engine": "simulated", "simulated_tok_per_s": 500.0},
                   "gemma3-270m": {"engine": "simulated", "simulated_tok_per_s": 500.0}},
        "hub": hub,
    })


CHAT = [{"role": "user", "content": "hi"}]


async def test_the_interceptor_answers_falls_through_refuses_and_fails_cleanly(tmp_path: Path) -> None:
    seen: list[InterceptContext] = []

    async def hook(body: Mapping[str, Any], context: InterceptContext, headers: Mapping[str, str]) -> Any:
        seen.append(context)
        mode = headers.get("X-Test-Mode")
        if mode == "answer":
            return {"id": "hub-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the hub"},
                                 "finish_reason": "stop", "logprobs": None}]}
        if mode == "stream":
            async def chunks() -> AsyncIterator[Mapping[str, Any]]:
                for text in ("one ", "two"):
                    yield {"id": "hub-2", "object": "chat.completion.chunk", "created": 0, "model": "m",
                           "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            return InterceptedResponse(stream=chunks())
        if mode == "refuse":
            raise PermissionDeniedError("not for this app", code="app_not_allowed")
        if mode == "crash":
            raise RuntimeError("bug in the host")
        return None

    async with Node(config(tmp_path), chat_completion_interceptor=hook) as node:
        assert node.base_url is not None
        client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)

        def headers(mode: str) -> dict[str, str]:
            return {"X-Test-Mode": mode}

        answered = await client.chat.completions.create(model="gemma3-270m", messages=CHAT,  # type: ignore[arg-type]
                                                         extra_headers=headers("answer"))
        assert answered.id == "hub-1" and answered.choices[0].message.content == "from the hub"
        stream = await client.chat.completions.create(model="gemma3-270m", messages=CHAT,  # type: ignore[arg-type]
                                                      stream=True, extra_headers=headers("stream"))
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "one two"
        through = await client.chat.completions.create(model="gemma3-270m", messages=CHAT,  # type: ignore[arg-type]
                                                       max_tokens=3, extra_headers=headers("none"))
        assert through.id.startswith("chatcmpl-") and through.choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="gemma3-270m", messages=CHAT,  # type: ignore[arg-type]
                                                 extra_headers=headers("refuse"))
        assert refused.value.code == "app_not_allowed"
        with pytest.raises(openai.APIStatusError) as crashed:
            await client.chat.completions.create(model="gemma3-270m", messages=CHAT,  # type: ignore[arg-type]
                                                 extra_headers=headers("crash"))
        assert crashed.value.status_code == 502 and crashed.value.code == "interceptor_failed"
        # the node still serves after a crashing hook
        assert (await client.chat.completions.create(model="gemma3-270m", messages=CHAT,  # type: ignore[arg-type]
                                                     max_tokens=2)).choices
    assert {c.app_id for c in seen} == {"anonymous"} and {c.peer_device_id for c in seen} == {"self"}
    assert {c.model for c in seen} == {"gemma3-270m"} and all(c.request_id for c in seen)


async def test_same_family_substitution_serves_the_nearest_model_and_says_so(tmp_path: Path) -> None:
    async with Node(config(tmp_path, substitution="same-family")) as node:
        assert node.base_url is not None
        async with aiohttp.ClientSession() as session:
            body = {"model": "Qwen2.5-3B-Instruct-Q4_K_M.gguf", "messages": CHAT, "max_tokens": 2}
            async with session.post(node.base_url + "/chat/completions", json=body) as response:
                answer = await response.json()
                assert response.status == 200, answer
                assert answer["model"] == "qwen2.5:7b-instruct"
                assert response.headers["X-DVAI-Substituted-From"] == "Qwen2.5-3B-Instruct-Q4_K_M.gguf"
            for model, code in (("my-finetune-v2", "model_family_unknown"), ("llama3.1:8b", "model_not_found")):
                async with session.post(node.base_url + "/chat/completions",
                                        json={**body, "model": model}) as response:
                    assert response.status == 404 and (await response.json())["error"]["code"] == code
            async with session.get(node.base_url.removesuffix("/v1") + "/v1/dvai/audit") as response:
                rows = (await response.json())["data"]
        row = next(r for r in rows if r["status"] == 200)
        assert (row["modelRequested"], row["modelServed"]) == ("Qwen2.5-3B-Instruct-Q4_K_M.gguf", "qwen2.5:7b-instruct")


async def test_without_a_policy_nothing_is_substituted(tmp_path: Path) -> None:
    async with Node(config(tmp_path)) as node:
        assert node.base_url is not None
        client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="qwen2.5:3b-instruct", messages=CHAT)  # type: ignore[arg-type]
        assert missing.value.code == "model_not_found"


def test_a_bad_substitution_map_is_refused_at_start(tmp_path: Path) -> None:
    from node.common.errors import ConfigError
    from node.hub.substitution import SubstitutionPolicy

    with pytest.raises(ConfigError, match="requested=served"):
        SubstitutionPolicy.from_config(config(tmp_path, substitution="map", substitution_map=["nope"]).hub)
    with pytest.raises(ConfigError, match="needs entries"):
        SubstitutionPolicy.from_config(config(tmp_path, substitution="map").hub)


# -- /v1/responses gets the same hub features as /v1/chat/completions ---------------------------


async def test_responses_pass_the_interceptor_quotas_usage_and_substitution(tmp_path: Path) -> None:
    seen: list[InterceptContext] = []

    def hook(body: Mapping[str, Any], context: InterceptContext, headers: Mapping[str, str]) -> Any:
        seen.append(context)
        if headers.get("X-Test-Mode") == "stream":
            async def events() -> AsyncIterator[Mapping[str, Any]]:
                yield {"type": "response.output_text.delta", "sequence_number": 0, "item_id": "m",
                       "output_index": 0, "content_index": 0, "delta": "from the hub", "logprobs": []}
            return InterceptedResponse(stream=events())
        return None

    quotas = [{"app_id": "com.acme.chat", "requests_per_minute": 3},
              {"app_id": "com.acme.notes", "tokens_per_day": 12}]
    async with Node(config(tmp_path, substitution="same-family", quotas=quotas),
                    chat_completion_interceptor=hook) as node:
        assert node.base_url is not None and node.context is not None and node.context.api_keys is not None
        _, chat_key = node.context.api_keys.create("com.acme.chat")
        _, notes_key = node.context.api_keys.create("com.acme.notes")
        chat = openai.AsyncOpenAI(base_url=node.base_url, api_key=chat_key, max_retries=0)
        notes = openai.AsyncOpenAI(base_url=node.base_url, api_key=notes_key, max_retries=0)
        # substitution: a 3B Qwen served by the 7B one, said in the body and a header
        raw = await chat.responses.with_raw_response.create(model="Qwen2.5-3B-Instruct-Q4_K_M.gguf",
                                                            input="hi", max_output_tokens=3)
        answer = raw.parse()
        assert answer.model == "qwen2.5:7b-instruct" and answer.output_text
        assert raw.headers["X-DVAI-Substituted-From"] == "Qwen2.5-3B-Instruct-Q4_K_M.gguf"
        with pytest.raises(openai.NotFoundError) as unknown:
            await chat.responses.create(model="my-finetune-v2", input="hi")
        assert unknown.value.code == "model_family_unknown"
        # the interceptor sees /v1/responses with the caller's app, and may answer with named events
        async with aiohttp.ClientSession() as session:
            async with session.post(node.base_url + "/responses", json={"model": "gemma3-270m", "input": "hi",
                                                                         "stream": True},
                                    headers={"Authorization": f"Bearer {chat_key}", "X-Test-Mode": "stream"}) as r:
                assert r.status == 200
                text = await r.text()
        assert "event: response.output_text.delta" in text and "from the hub" in text
        # requests per minute: the 4th of the minute (counting the unknown-family and the intercepted ones)
        with pytest.raises(openai.RateLimitError) as limited:
            await chat.responses.create(model="gemma3-270m", input="hi", max_output_tokens=2)
        assert limited.value.code == "rate_limit_exceeded"
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        # tokens per day: streamed answers count too, then the budget is spent
        stream = await notes.responses.create(model="gemma3-270m", input="hi there", max_output_tokens=8,
                                              stream=True)
        kinds = [event.type async for event in stream]
        assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
        with pytest.raises(openai.RateLimitError) as spent:
            await notes.responses.create(model="gemma3-270m", input="hi", max_output_tokens=2)
        assert spent.value.code == "insufficient_quota" and spent.value.response.headers["Retry-After"]
        # usage accounting: per app and served model
        assert node.context.usage is not None
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            async with session.get(node.base_url + "/dvai/usage?days=1") as response:
                rows = (await response.json())["data"]
        await chat.close()
        await notes.close()
    by_app = {(row["appId"], row["model"]): row for row in rows}
    assert by_app[("com.acme.chat", "qwen2.5:7b-instruct")]["requests"] == 1
    notes_row = by_app[("com.acme.notes", "gemma3-270m")]
    assert notes_row["requests"] == 1 and notes_row["completionTokens"] == 8
    assert {c.endpoint for c in seen} == {"/v1/responses"}
    assert {c.app_id for c in seen} == {"com.acme.chat", "com.acme.notes"}
