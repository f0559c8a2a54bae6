"""Offload end to end: real node processes on loopback, paired through the pairing API.

The mesh (one module-wide set of processes, started in parallel):

- ``slow``: the entry node, SIMULATED engines at 2 tok/s (below its 4 tok/s threshold, kept low
  so the real engine qualifies even on a busy 2-core machine)
  for the models ``sim``, ``victim``, ``solo`` and ``gemma3-270m``; finds its peers through
  custom discovery, which passes on each peer's *claimed* speed.
- ``fast``: SIMULATED ``sim`` at 40 tok/s, paired, claims 30.
- ``liar``: SIMULATED ``sim`` at 2.5 tok/s, paired, claims 1000 tok/s.
- ``unpaired``: SIMULATED ``sim`` at 80 tok/s, claims 80, never paired.
- ``stub``: a stub peer (health, pairing, one token per answer), paired, claims 500: its
  verification is inconclusive, so it stays unverified.
- ``real``: the REAL engine (llama.cpp, the default model as ``gemma3-270m``), paired.
- ``victim-a/b/c``: SIMULATED ``victim`` at 40 tok/s, paired; revoked and killed by the failure test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from node import Node
from node.config import load_config
from node.discovery import Peer

from .conftest import NodeProcess, start_node_process
from .offload_support import (
    PEERS_FILE_ENV,
    InconclusiveStubPeer,
    StreamResult,
    chat,
    device_id_for,
    node_config,
    offload_status,
    pair,
    peer_state,
    post_stream,
    simulated_models,
    wait_until,
    write_forged_capability,
)

THRESHOLD = 4
VICTIMS = ("victim-a", "victim-b", "victim-c")
SIM_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


@dataclass
class Mesh:
    base: Path
    slow: NodeProcess
    fast: NodeProcess
    liar: NodeProcess
    unpaired: NodeProcess
    real: NodeProcess
    victims: list[NodeProcess]
    stub: InconclusiveStubPeer
    ids: dict[str, str]


def start_all(specs: dict[str, tuple[Path, str]], env: dict[str, str] | None = None) -> dict[str, NodeProcess]:
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(start_node_process, state, config_text=config, env=env)
                   for name, (state, config) in specs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("offload")
    slow_id = device_id_for(base / "slow")
    allow = [slow_id, device_id_for(base / "embedded")]
    sim = simulated_models
    specs = {
        "fast": (base / "fast", node_config(sim({"sim": 40}), offload=False, allow=allow)),
        "liar": (base / "liar", node_config(sim({"sim": 2.5}), offload=False, allow=allow)),
        "unpaired": (base / "unpaired", node_config(sim({"sim": 80}), offload=False)),
        "real": (base / "real", node_config("[models.gemma3-270m]\nqueue_depth = 4\nthreads = 1\n", offload=False,
                                            allow=allow)),
        "victim-a": (base / "victim-a", node_config(sim({"victim": 40}), offload=False, allow=allow)),
        "victim-b": (base / "victim-b", node_config(sim({"victim": 40}), offload=False, allow=allow)),
        "victim-c": (base / "victim-c", node_config(sim({"victim": 40}), offload=False, allow=allow)),
    }
    nodes: dict[str, NodeProcess] = {}
    stub = InconclusiveStubPeer(base / "stub", "sim")
    stub.start()
    try:
        nodes.update(start_all(specs))
        ids = {name: device_id_for(spec[0]) for name, spec in specs.items()} | {"slow": slow_id,
                                                                               "stub": stub.device_id}
        claims = {"fast": 30, "liar": 1000, "unpaired": 80}
        peers = [{"baseUrl": node.base_url, "deviceId": ids[name],
                  "capability": {"sim": claims[name]} if name in claims else {}} for name, node in nodes.items()]
        peers.append({"baseUrl": stub.base_url, "deviceId": stub.device_id, "capability": {"sim": 500}})
        peers_file = base / "peers.json"
        peers_file.write_text(json.dumps(peers))
        slow_models = sim({"sim": 2, "victim": 2, "solo": 2, "gemma3-270m": 2})
        slow_config = node_config(slow_models, threshold=THRESHOLD, custom_discovery=True)
        nodes.update(start_all({"slow": (base / "slow", slow_config)},
                               env={PEERS_FILE_ENV: str(peers_file)}))
        asyncio.run(_connect(nodes, ids, stub))
        yield Mesh(base, nodes["slow"], nodes["fast"], nodes["liar"], nodes["unpaired"], nodes["real"],
                   [nodes[n] for n in VICTIMS], stub, ids)
    finally:
        for node in nodes.values():
            node.stop()
        stub.stop()


async def _connect(nodes: dict[str, NodeProcess], ids: dict[str, str], stub: InconclusiveStubPeer) -> None:
    slow = nodes["slow"]
    async with aiohttp.ClientSession() as session:
        async def all_reachable() -> bool:
            others = [ids[n] for n in nodes if n != "slow"] + [stub.device_id]
            return all([await peer_state(session, slow.root, d) == "reachable" for d in others])

        await wait_until(all_reachable, 15)
        targets = [nodes[n].base_url for n in ("fast", "liar", "real", *VICTIMS)] + [stub.base_url]
        await asyncio.gather(*(pair(session, slow.root, url) for url in targets))


def expected_words(count: int) -> str:
    return " ".join(SIM_WORDS[i % len(SIM_WORDS)] for i in range(count))


async def test_prefer_on_a_slow_node_is_served_by_the_fast_paired_peer(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        relayed = await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=24))
        first_request_s = time.perf_counter() - started
        assert relayed.status == 200 and relayed.served_by == mesh.ids["fast"]
        assert relayed.headers["Content-Type"].startswith("text/event-stream")
        direct = await post_stream(session, mesh.fast.base_url + "/chat/completions", chat("sim", max_tokens=24),
                                   {"X-DVAI-Offload": "never"})
        assert relayed.text == direct.text == expected_words(24)
        assert relayed.events[-1] == "[DONE]" and relayed.events[-2]["choices"][0]["finish_reason"] == "length"
        assert [_shape(e) for e in relayed.events] == [_shape(e) for e in direct.events]
        # Relayed as the tokens come: spread over the peer's decode time, not in one lump,
        # and at the peer's 40 tok/s (the slow node would need 6 s for 24 tokens).
        times = relayed.content_times
        assert len(times) == 24 and 0.4 < times[-1] - times[0] < 3.0, times[-1] - times[0]
        assert first_request_s < 5.0  # includes verifying the peers it could use

        # Not streamed: the peer's JSON, unchanged, with the header.
        async with session.post(mesh.slow.base_url + "/chat/completions", json=chat("sim", max_tokens=5)) as response:
            body = await response.json()
            assert response.status == 200 and response.headers["X-DVAI-Served-By"] == mesh.ids["fast"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == expected_words(5)
        assert body["usage"]["completion_tokens"] == 5

        # The legacy completions surface is offloaded too.
        legacy = await post_stream(session, mesh.slow.base_url + "/completions",
                                   {"model": "sim", "prompt": "Once", "max_tokens": 6})
        assert legacy.served_by == mesh.ids["fast"] and legacy.text == expected_words(6)

        # `require` is met by the fast peer as well.
        required = await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=3),
                                     {"X-DVAI-Offload": "require"})
        assert required.status == 200 and required.served_by == mesh.ids["fast"]


def _shape(event: object) -> object:
    """An event without its per-response id and timestamp."""
    if isinstance(event, dict):
        return {k: v for k, v in event.items() if k not in ("id", "created")}
    return event


async def test_the_library_calls_on_offload_with_the_peer(mesh: Mesh) -> None:
    seen: list[Peer] = []
    config = load_config(env={}, overrides={
        "state_dir": str(mesh.base / "embedded"), "http_base_port": 0,
        "models": {"sim": {"engine": "simulated", "simulated_tok_per_s": 2}},
        "offload": {"enabled": True, "discover_lan": False, "probe_on_start": False,
                    "min_local_capability": THRESHOLD, "health_interval": 0.5,
                    "known_peers": [{"base_url": mesh.fast.base_url}]},
    })
    async with Node(config, on_offload=seen.append) as node, aiohttp.ClientSession() as session:
        assert node.base_url is not None
        root = node.base_url.removesuffix("/v1")

        async def fast_reachable() -> bool:
            return await peer_state(session, root, mesh.ids["fast"]) == "reachable"

        await wait_until(fast_reachable, 10)
        await pair(session, root, mesh.fast.base_url)
        result = await post_stream(session, node.base_url + "/chat/completions", chat("sim", max_tokens=3))
    assert result.served_by == mesh.ids["fast"] and result.text == expected_words(3)
    assert [(p.device_id, p.base_url) for p in seen] == [(mesh.ids["fast"], mesh.fast.base_url)]


async def test_never_stays_local_and_the_header_is_checked(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        local = await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=3),
                                  {"X-DVAI-Offload": "never"})
        assert local.status == 200 and local.served_by == mesh.ids["slow"] and local.text == expected_words(3)
        async with session.post(mesh.slow.base_url + "/chat/completions", json=chat("sim"),
                                headers={"X-DVAI-Offload": "maybe"}) as response:
            assert response.status == 400
            assert await response.json() == {"error": {
                "message": "Invalid X-DVAI-Offload header 'maybe': expected one of prefer, never, require",
                "type": "invalid_request_error", "code": "invalid_offload_header", "param": "X-DVAI-Offload"}}
        # Offload disabled (the fast node): the header is ignored, as in the reference.
        async with session.post(mesh.fast.base_url + "/chat/completions", json=chat("sim", max_tokens=2),
                                headers={"X-DVAI-Offload": "maybe"}) as response:
            assert response.status == 200 and response.headers["X-DVAI-Served-By"] == mesh.ids["fast"]
        async with session.get(mesh.fast.root + "/v1/dvai/offload") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "offload_disabled"


async def test_an_unsigned_hop_marker_is_not_honoured(mesh: Mesh) -> None:
    """Anyone can add X-DVAI-Hop: unsigned, it only stops the request from being forwarded."""
    async with aiohttp.ClientSession() as session:
        marked = await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=2),
                                   {"X-DVAI-Hop": "someone"})
        assert marked.status == 200 and marked.served_by == mesh.ids["slow"]
        refused = await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=2),
                                    {"X-DVAI-Hop": "someone", "X-DVAI-Offload": "require"})
        assert refused.status == 503
        assert refused.body["error"]["checked"] == [{"deviceId": "self", "capabilityScore": 2,
                                                     "reason": "below threshold"}]


async def test_a_peer_that_claims_more_than_it_delivers_is_not_preferred(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(mesh.slow.root + "/v1/dvai/peers") as response:
            claims = {p["deviceId"]: p["capability"].get("sim") for p in (await response.json())["data"]}
        assert claims[mesh.ids["liar"]] == 1000  # trusting claims, the liar would win

        async def liar_measured() -> bool:
            status = await offload_status(session, mesh.slow.root)
            return any(p["deviceId"] == mesh.ids["liar"] and p["verified"] for p in status["peers"])

        await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=2))
        await wait_until(liar_measured, 12)
        verified = {p["deviceId"]: p["verified"][0]["tokPerS"]
                    for p in (await offload_status(session, mesh.slow.root))["peers"] if p["verified"]}
        assert 1.5 < verified[mesh.ids["liar"]] < 3.5  # what it delivers: 2.5 tok/s, below the threshold
        assert 30 < verified[mesh.ids["fast"]] < 46
        served = [(await post_stream(session, mesh.slow.base_url + "/chat/completions",
                                     chat("sim", max_tokens=2))).served_by for _ in range(3)]
        assert served == [mesh.ids["fast"]] * 3


async def test_unpaired_and_unverified_peers_are_never_used(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            result = await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=2))
            assert result.served_by == mesh.ids["fast"]
        status = await offload_status(session, mesh.slow.root)
        by_id = {p["deviceId"]: p for p in status["peers"]}
        unpaired = by_id.get(mesh.ids["unpaired"], {"requests": 0, "verified": []})
        assert unpaired["requests"] == 0 and unpaired["verified"] == []  # never probed, never sent anything
        assert mesh.ids["stub"] not in by_id or not by_id[mesh.ids["stub"]]["verified"]
        async with session.get(mesh.unpaired.root + "/v1/dvai/audit") as response:
            assert (await response.json())["data"] == []
    # The stub got verification probes only (signed, hop-marked /v1/completions), never a request.
    assert mesh.stub.requests and set(mesh.stub.requests) == {("/v1/completions", True)}


@pytest.mark.engine
async def test_a_slow_simulated_node_offloads_to_the_real_engine(mesh: Mesh) -> None:
    import openai

    async with aiohttp.ClientSession() as session:
        result = await post_stream(session, mesh.slow.base_url + "/chat/completions",
                                   chat("gemma3-270m", "Name a colour.", max_tokens=12))
        assert result.status == 200 and result.served_by == mesh.ids["real"], "".join(mesh.slow.output[-20:])
        assert result.text.strip() and result.events[-1] == "[DONE]"
    client = openai.AsyncOpenAI(base_url=mesh.slow.base_url, api_key="unused", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="gemma3-270m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert raw.headers["X-DVAI-Served-By"] == mesh.ids["real"]
    assert raw.parse().choices[0].message.content
    stream = await client.chat.completions.create(
        model="gemma3-270m", messages=[{"role": "user", "content": "Count to three."}], max_tokens=10, stream=True)
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces).strip()
    await client.close()


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


@pytest.mark.engine
async def test_tools_structured_outputs_and_responses_through_the_mesh(mesh: Mesh) -> None:
    """The slow node forwards agent requests untouched; the real peer does the work."""
    import jsonschema
    import openai

    ask = [{"role": "user", "content": "Weather in Paris?"}]
    client = openai.AsyncOpenAI(base_url=mesh.slow.base_url, api_key="unused", max_retries=0, timeout=120)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gemma3-270m", messages=ask, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
            temperature=0, max_tokens=100)
        assert raw.headers["X-DVAI-Served-By"] == mesh.ids["real"]
        first = raw.parse().choices[0]
        assert first.finish_reason == "tool_calls" and first.message.tool_calls
        call = first.message.tool_calls[0]
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        history = [*ask, first.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
        final = await client.chat.completions.with_raw_response.create(
            model="gemma3-270m", messages=history, tools=TOOLS, tool_choice="none",  # type: ignore[arg-type]
            temperature=0, max_tokens=12)
        assert final.headers["X-DVAI-Served-By"] == mesh.ids["real"]
        assert final.parse().choices[0].message.content

        async with client.chat.completions.stream(
                model="gemma3-270m", messages=ask, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                parallel_tool_calls=False, temperature=0, max_tokens=100) as stream:
            streamed = await stream.get_final_completion()
        assert streamed.choices[0].message.tool_calls is not None
        jsonschema.validate(json.loads(streamed.choices[0].message.tool_calls[0].function.arguments), WEATHER)

        structured = await client.chat.completions.create(
            model="gemma3-270m", messages=ask, temperature=0, max_tokens=100,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})
        jsonschema.validate(json.loads(structured.choices[0].message.content or ""), WEATHER)

        response = await client.responses.with_raw_response.create(
            model="gemma3-270m", input="Weather in Rome?", tool_choice="required", max_output_tokens=100,
            tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}])
        assert response.headers["X-DVAI-Served-By"] == mesh.ids["real"]
        items = [i for i in response.parse().output if i.type == "function_call"]
        assert items and json.loads(items[0].arguments)["unit"] in ("celsius", "fahrenheit")
    finally:
        await client.close()


async def test_a_peer_without_tool_support_is_not_chosen(mesh: Mesh) -> None:
    """``fast`` serves ``sim`` on a SIMULATED engine, which cannot constrain its output: its health
    report does not list ``tools``, so a tool request never goes there (a plain one does)."""
    tool_chat = {**chat("sim", max_tokens=8), "tools": TOOLS, "tool_choice": "required"}
    async with aiohttp.ClientSession() as session:
        plain = await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=3),
                                  {"X-DVAI-Offload": "require"})
        assert plain.status == 200 and plain.served_by == mesh.ids["fast"]
        async with session.post(mesh.slow.base_url + "/chat/completions", json=tool_chat,
                                headers={"X-DVAI-Offload": "require"}) as response:
            body = await response.json()
            assert response.status == 503, body
        reasons = {c["deviceId"]: c["reason"] for c in body["error"]["checked"][1:]}
        assert reasons[mesh.ids["fast"]] == "model not served"
        # Under prefer it stays here, and this SIMULATED model refuses rather than ignore the grammar.
        async with session.post(mesh.slow.base_url + "/chat/completions", json=tool_chat) as response:
            refused = await response.json()
            assert response.status == 400 and refused["error"]["param"] == "tool_choice"
        peers = await (await session.get(mesh.slow.root + "/v1/dvai/peers")).json()
    listed = {p["deviceId"]: p for p in peers["data"]}
    assert "tools" in listed[mesh.ids["real"]]["features"]["gemma3-270m"]
    assert "tools" not in listed[mesh.ids["fast"]]["features"]["sim"]


async def test_require_with_no_qualified_device_returns_the_exact_503(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(mesh.slow.base_url + "/chat/completions", json=chat("solo"),
                                headers={"X-DVAI-Offload": "require", "X-Request-Id": "req-solo-1"}) as response:
            body = await response.json()
            assert response.status == 503 and response.headers["Retry-After"] == "30"
    error = body["error"]
    assert list(body) == ["error"]
    assert list(error) == ["type", "code", "message", "checked", "localCapability", "requiredAtLeast",
                           "rendezvousConfigured", "pairedRemotePeers", "requestId"]
    assert error["type"] == "no_capable_device" and error["code"] == 503
    assert error["message"] == "No device with capability ≥ 4 tok/s for model solo was reachable."
    assert error["checked"][0] == {"deviceId": "self", "capabilityScore": 2, "reason": "below threshold"}
    reasons = {c["deviceId"]: c["reason"] for c in error["checked"][1:]}
    assert reasons[mesh.ids["unpaired"]] == "not paired"
    assert reasons[mesh.ids["fast"]] == "model not served"
    assert set(reasons) == {mesh.ids[n] for n in ("fast", "liar", "unpaired", "real", *VICTIMS, "stub")}
    assert all(set(c) == {"deviceId", "capabilityScore", "reason"} for c in error["checked"])
    assert error["localCapability"] == 2 and error["requiredAtLeast"] == 4
    assert error["rendezvousConfigured"] is False and error["pairedRemotePeers"] == 7
    assert error["requestId"] == "req-solo-1"


async def test_a_client_disconnect_cancels_the_peers_generation(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        partial = await post_stream(session, mesh.slow.base_url + "/chat/completions", chat("sim", max_tokens=400),
                                    stop_after=5)
        assert partial.served_by == mesh.ids["fast"] and len(partial.events) == 5
        stopped_at = time.monotonic()

        async def fast_is_idle() -> bool:
            async with session.get(mesh.fast.root + "/v1/dvai/health") as response:
                models = {m["id"]: m for m in (await response.json())["models"]}
            return models["sim"]["queueDepth"] == 0

        await wait_until(fast_is_idle, 2.0, interval=0.02)
        assert time.monotonic() - stopped_at < 1.0  # not the 10 s the 400 tokens would take
        peer = next(p for p in (await offload_status(session, mesh.slow.root))["peers"]
                    if p["deviceId"] == mesh.ids["fast"])
        assert peer["cancelled"] >= 1 and peer["failures"] == 0 and peer["circuit"] == "closed"

        async def audited_as_closed() -> bool:  # the audit log is written in batches, off the loop
            async with session.get(mesh.fast.root + "/v1/dvai/audit") as response:
                rows = (await response.json())["data"]
            return any(r["status"] == 499 and r["peerDeviceId"] == mesh.ids["slow"] for r in rows)

        await wait_until(audited_as_closed, 3.0)


async def test_peer_failures_fall_back_and_a_broken_stream_ends_cleanly(mesh: Mesh) -> None:
    victims = {mesh.ids[name]: node for name, node in zip(VICTIMS, mesh.victims, strict=True)}
    url = mesh.slow.base_url + "/chat/completions"
    async with aiohttp.ClientSession() as session:
        async def all_verified() -> bool:
            status = await offload_status(session, mesh.slow.root)
            return sum(1 for p in status["peers"] if p["deviceId"] in victims and p["verified"]) == 3

        await post_stream(session, url, chat("victim", max_tokens=2))
        await wait_until(all_verified, 5)
        best = (await post_stream(session, url, chat("victim", max_tokens=2))).served_by
        assert best in victims

        # The best peer stopped trusting us (it revoked our pairing): it answers 401 before any
        # byte, so the request goes to the next peer and the client never notices.
        async with session.delete(victims[best].root + f"/v1/dvai/pairings/{mesh.ids['slow']}") as response:
            assert response.status == 200
        second = await post_stream(session, url, chat("victim", max_tokens=4))
        assert second.status == 200 and second.text == expected_words(4)
        assert second.served_by in victims and second.served_by != best

        # Killed before a request: refused (or already seen as unreachable); the third one serves it.
        victims[second.served_by].process.kill()
        third = await post_stream(session, url, chat("victim", max_tokens=4))
        assert third.status == 200 and third.text == expected_words(4)
        last = third.served_by
        assert last in victims and last not in (best, second.served_by)

        # Killed mid-stream: a well-formed error event, then [DONE], without hanging.
        async def kill_soon() -> None:
            await asyncio.sleep(0.5)
            victims[last].process.kill()

        killer = asyncio.create_task(kill_soon())
        started = time.monotonic()
        broken = await post_stream(session, url, chat("victim", max_tokens=200))
        await killer
        assert time.monotonic() - started < 3.0
        assert broken.status == 200 and broken.served_by == last
        assert broken.events[-1] == "[DONE]"
        error = broken.events[-2]["error"]
        assert error["type"] == "server_error" and error["code"] == "peer_failed" and error["message"]
        assert 5 <= len(broken.content_times) < 200

        # Every peer failed: the failed ones are circuit-broken; the slow node serves it itself (prefer).
        status = {p["deviceId"]: p for p in (await offload_status(session, mesh.slow.root))["peers"]}
        # best was tried first only if it still ranked first (observed rates move under load).
        assert status[best]["failures"] in (0, 1)
        assert status[best]["failures"] == 0 or status[best]["circuit"] == "open"
        assert status[last]["failures"] == 1 and status[last]["circuit"] == "open"
        local = await post_stream(session, url, chat("victim", max_tokens=2))
        assert local.status == 200 and local.served_by == mesh.ids["slow"]


# --------------------------------------------------------------------------------------
# A ring: A forwards to B, B to C, C to A; each believes it is slow (a forged stored score
# of 1 tok/s while its SIMULATED engine runs at 60) and measures its successor at 60.


async def test_a_ring_of_nodes_that_all_prefer_never_loops(tmp_path: Path) -> None:
    names = ("a", "b", "c")
    states = {n: tmp_path / n for n in names}
    ids = {n: device_id_for(states[n]) for n in names}
    for n in names:
        write_forged_capability(states[n], "ring", 1.0)
    peers_file = tmp_path / "peers.json"
    peers_file.write_text("[]")
    predecessor = {"a": "c", "b": "a", "c": "b"}
    successor = {"a": "b", "b": "c", "c": "a"}
    specs = {n: (states[n], node_config(simulated_models({"ring": 60}), threshold=30, allow=[ids[predecessor[n]]],
                                        custom_discovery=True).replace("custom_discovery_interval = 60",
                                                                       "custom_discovery_interval = 0.5"))
             for n in names}
    nodes = start_all(specs, env={PEERS_FILE_ENV: str(peers_file)})
    try:
        peers_file.write_text(json.dumps([{"baseUrl": nodes[n].base_url, "deviceId": ids[n]} for n in names]))
        async with aiohttp.ClientSession() as session:
            async def ring_visible() -> bool:
                return all([await peer_state(session, nodes[n].root, ids[successor[n]]) == "reachable"
                            for n in names])

            await wait_until(ring_visible, 10)
            await asyncio.gather(*(pair(session, nodes[n].root, nodes[successor[n]].base_url) for n in names))
            # max_tokens 6: under the 8 tokens that update a node's observed speed, so each
            # keeps believing it is slow while it serves its predecessor's requests. Each node
            # sends its three one after another (the three nodes at once): the policy ranks by
            # the rate a new request would get, and the verification probe a node serves for its
            # predecessor (32 tokens) lifts its own observed speed to 0.25 × 60 + 0.75 × 1 ≈ 15.8
            # tok/s, so with three of ours already queued at the successor (60 / 4 = 15) keeping
            # the request would be the right call, not a loop; one at a time keeps every request
            # on the ring's path.
            async def send_three(n: str) -> list[StreamResult]:
                return [await post_stream(session, nodes[n].base_url + "/chat/completions",
                                          chat("ring", max_tokens=6)) for _ in range(3)]

            results = [r for batch in await asyncio.gather(*(send_three(n) for n in names)) for r in batch]
            served = [r.served_by for r in results]
            assert served == [ids[successor[n]] for n in names for _ in range(3)]
            assert all(r.status == 200 and r.text == expected_words(6) for r in results)
            # Each request was generated exactly once: 9 locally served chat rows in all,
            # each hop-forwarded by the predecessor and signed by it.
            served_rows: list[tuple[str, dict[str, object]]] = []

            async def audited() -> bool:  # the audit log is written in batches, off the loop
                served_rows.clear()
                for n in names:
                    async with session.get(nodes[n].root + "/v1/dvai/audit") as response:
                        rows = (await response.json())["data"]
                    served_rows.extend((n, r) for r in rows
                                       if r["endpoint"] == "/v1/chat/completions" and r["servedBy"] == "local")
                return len(served_rows) >= 9

            await wait_until(audited, 3.0, interval=0.2)
            await asyncio.sleep(0.3)
            assert await audited() and len(served_rows) == 9
            assert all(r["peerDeviceId"] == ids[predecessor[n]] for n, r in served_rows)
    finally:
        for node in nodes.values():
            node.stop()
