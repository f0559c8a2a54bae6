"""The embeddable Node: in-process calls (transport none) and the HTTP transport's port handling."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest

from node import Node, load_config

pytestmark = pytest.mark.engine


def config(tmp_path: Path, **extra: object):  # noqa: ANN201
    return load_config(env={}, overrides={"state_dir": str(tmp_path), **extra})


async def test_in_process_node_serves_without_a_port(tmp_path: Path, default_model: Path) -> None:
    cfg = config(tmp_path, transport="none", models={
        "gemma3-270m": {}, "embed": {"path": str(default_model), "embedding": True, "ctx_size": 256}})
    async with Node(cfg) as node:
        assert node.base_url is None and node.port is None
        chat = await node.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] <= 4
        chunks = [c async for c in node.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=4)]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        text = await node.completion("1, 2, 3,", max_tokens=4, temperature=0)
        assert text["object"] == "text_completion" and "4" in text["choices"][0]["text"]
        vectors = await node.embedding(["one", "two"])
        assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 100


async def test_port_retry_skips_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        cfg = config(tmp_path, http_base_port=busy, models={"sim": {"engine": "simulated"}})
        async with Node(cfg) as node:
            assert node.port is not None and busy < node.port <= busy + 15
            assert node.base_url == f"http://127.0.0.1:{node.port}/v1"


async def test_health_says_loading_until_models_are_ready(tmp_path: Path, default_model: Path) -> None:
    node = Node(config(tmp_path, http_base_port=0))
    await node.start(wait_ready=False)
    try:
        assert node.context is not None
        async with aiohttp.ClientSession() as session:
            early = await session.get(node.base_url[:-3] + "/v1/dvai/health")
            assert early.status == 503 and (await early.json())["status"] == "loading"
            await node.context.registry.wait_preloaded()
            ready = await session.get(node.base_url[:-3] + "/v1/dvai/health")
            assert ready.status == 200 and (await ready.json())["status"] == "ok"
    finally:
        await node.close()


async def test_a_missing_model_file_is_reported_not_crashed(tmp_path: Path) -> None:
    cfg = config(tmp_path, http_base_port=0, models={"ghost": {"path": str(tmp_path / "none.gguf")}})
    async with Node(cfg) as node, aiohttp.ClientSession() as session:
        health = await session.get(node.base_url[:-3] + "/v1/dvai/health")
        body = await health.json()
        assert health.status == 503 and body["status"] == "failed"
        assert "no such file" in body["models"][0]["error"]
        response = await session.post(node.base_url + "/completions", json={"model": "ghost", "prompt": "x"})
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "model_unavailable"


async def test_lazy_model_loads_on_first_use_and_idle_model_unloads(tmp_path: Path) -> None:
    # SIMULATED engines: this is about the registry's lifecycle, not inference.
    cfg = config(tmp_path, transport="none", models={
        "eager": {"engine": "simulated", "simulated_tok_per_s": 500},
        "lazy": {"engine": "simulated", "simulated_tok_per_s": 500, "preload": False, "keep_alive": 0.3}})
    async with Node(cfg) as node:
        assert node.context is not None
        registry = node.context.registry
        assert registry.resolve("eager").state == "ready" and registry.resolve("lazy").state == "unloaded"
        await node.completion("x", model="lazy", max_tokens=2)
        assert registry.resolve("lazy").state == "ready"
        for _ in range(40):
            if registry.resolve("lazy").state == "unloaded":
                break
            await asyncio.sleep(0.05)
        assert registry.resolve("lazy").state == "unloaded"  # idle past keep_alive
        assert registry.resolve("eager").state == "ready"  # no keep_alive: stays loaded
        again = await node.completion("x", model="lazy", max_tokens=2)
        assert again["usage"]["completion_tokens"] == 2 and registry.resolve("lazy").state == "ready"


async def test_generation_timeout_ends_with_length_streamed_or_not(tmp_path: Path) -> None:
    """SIMULATED engine at 20 tok/s, 0.5 s limit: the text so far, finish_reason "length"."""
    cfg = config(tmp_path, transport="none", generation_timeout=0.5,
                 models={"sim": {"engine": "simulated", "simulated_tok_per_s": 20}})
    async with Node(cfg) as node:
        reply = await node.chat_completion([{"role": "user", "content": "go"}], max_tokens=1000)
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "length"
        assert 3 <= reply["usage"]["completion_tokens"] < 1000 and choice["message"]["content"].startswith("alpha")
        chunks = [c async for c in node.stream_chat([{"role": "user", "content": "go"}], max_tokens=1000)]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and text.startswith("alpha bravo")


async def test_keep_alive_zero_unloads_after_the_request(tmp_path: Path) -> None:
    """SIMULATED engine: the registry's lifecycle with a per-request keep_alive."""
    cfg = config(tmp_path, transport="none", models={"sim": {"engine": "simulated", "simulated_tok_per_s": 500}})
    async with Node(cfg) as node:
        assert node.context is not None
        slot = node.context.registry.resolve("sim")
        await node.completion("x", max_tokens=2, keep_alive="10m")
        assert slot.state == "ready" and 590 < (slot.keep_alive_left(slot.last_used) or 0) <= 600
        await node.completion("x", max_tokens=2, keep_alive=0)
        for _ in range(40):
            if slot.state == "unloaded":
                break
            await asyncio.sleep(0.01)
        assert slot.state == "unloaded"
        await node.completion("x", max_tokens=2)  # loads again; back to the configured keep_alive (none)
        assert slot.state == "ready" and slot.keep_alive_left(slot.last_used) is None
