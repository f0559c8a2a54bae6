"""GET /metrics: real nodes over real HTTP, scraped and parsed with the Prometheus parser.

Most nodes here run the SIMULATED engine (filler tokens at a set rate); one test uses the
real engine and checks the token counters against the response's ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from node import Node, load_config
from node.api.record import UNMATCHED
from node.constants import MAX_METRIC_PEER_LABELS
from node.engine.record import RequestRecord
from node.metrics import OTHER, BoundedLabels, NodeMetrics
from node.pairing import Pairing
from node.security import sign_request_headers

CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sim_config(tmp_path: Path, tok_per_s: float = 200, **extra: Any):  # noqa: ANN201
    """A node on a free loopback port serving one SIMULATED model, ``sim``."""
    return load_config(env={}, overrides={
        "state_dir": str(tmp_path), "http_base_port": 0, "audit": {"enabled": False},
        "models": {"sim": {"engine": "simulated", "simulated_tok_per_s": tok_per_s}}, **extra})


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (sample, labels), v in samples.items() if sample == name}


def root(node: Node) -> str:
    assert node.base_url is not None
    return node.base_url[: -len("/v1")]


async def scrape(session: aiohttp.ClientSession, node: Node) -> Samples:
    async with session.get(root(node) + "/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        return parse(await response.text())


def chat_body(max_tokens: int, *, stream: bool = False, model: str = "sim") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi there"}],
                            "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_usage(response: aiohttp.ClientResponse) -> dict[str, int]:
    usage = None
    async for line in response.content:
        text = line.decode().strip()
        if text.startswith("data: {"):
            usage = json.loads(text[6:]).get("usage") or usage
    assert usage is not None
    return usage


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


# --------------------------------------------------------------------------
# Requests, errors, tokens, histograms


async def test_counts_chat_stream_404_and_400_exactly(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    async with Node(sim_config(tmp_path)) as node:
        before = await scrape(session, node)
        assert series(before, "dvai_http_requests_total") == {}  # a scrape is not itself counted

        async with session.post(root(node) + CHAT, json=chat_body(5)) as response:
            assert response.status == 200
            plain = (await response.json())["usage"]
        async with session.post(root(node) + CHAT, json=chat_body(7, stream=True)) as response:
            assert response.status == 200
            streamed = await stream_usage(response)
        async with session.get(root(node) + "/v1/no-such-thing") as response:
            assert response.status == 404
        async with session.post(root(node) + CHAT, data=b"{not json") as response:
            assert response.status == 400
        async with session.post(root(node) + CHAT, json=chat_body(3, model="ghost")) as response:
            assert response.status == 404

        samples = await scrape(session, node)
    requests = series(samples, "dvai_http_requests_total")
    assert requests == {
        frozenset({"endpoint": CHAT, "method": "POST", "status": "200", "served_by": "local"}.items()): 2,
        frozenset({"endpoint": CHAT, "method": "POST", "status": "400", "served_by": "local"}.items()): 1,
        frozenset({"endpoint": CHAT, "method": "POST", "status": "404", "served_by": "local"}.items()): 1,
        frozenset({"endpoint": UNMATCHED, "method": "GET", "status": "404", "served_by": "local"}.items()): 1,
    }
    assert series(samples, "dvai_http_errors_total") == {
        frozenset({"endpoint": CHAT, "code": "invalid_request"}.items()): 1,
        frozenset({"endpoint": CHAT, "code": "model_not_found"}.items()): 1,
        frozenset({"endpoint": UNMATCHED, "code": "not_found"}.items()): 1,
    }
    assert plain["completion_tokens"] == 5 and streamed["completion_tokens"] == 7
    labels = {"model": "sim", "served_by": "local"}
    assert value(samples, "dvai_completion_tokens_total", **labels) == 12
    assert value(samples, "dvai_prompt_tokens_total", **labels) == plain["prompt_tokens"] + streamed["prompt_tokens"]
    # the unknown model requested by the client never became a label value
    assert {dict(k)["model"] for k in series(samples, "dvai_prompt_tokens_total")} == {"sim"}

    assert value(samples, "dvai_time_to_first_token_seconds_count", **labels) == 2
    first_token_sum = value(samples, "dvai_time_to_first_token_seconds_sum", **labels)
    assert first_token_sum is not None and 0 < first_token_sum < 2
    assert value(samples, "dvai_time_to_first_token_seconds_bucket", **labels, le="30.0") == 2
    assert value(samples, "dvai_decode_rate_tokens_per_second_count", **labels) == 2
    assert value(samples, "dvai_decode_rate_tokens_per_second_bucket", **labels, le="1.0") == 0
    assert value(samples, "dvai_decode_rate_tokens_per_second_bucket", **labels, le="+Inf") == 2


async def test_decode_rate_lands_in_the_simulated_speed_buckets(tmp_path: Path,
                                                                session: aiohttp.ClientSession) -> None:
    async with Node(sim_config(tmp_path, tok_per_s=40)) as node:
        for _ in range(2):
            async with session.post(root(node) + CHAT, json=chat_body(8)) as response:
                assert response.status == 200
        samples = await scrape(session, node)
    labels = {"model": "sim", "served_by": "local"}
    # 40 tok/s: every observation lands between the 20 and 75 tok/s bounds (margin for a busy CPU)
    assert value(samples, "dvai_decode_rate_tokens_per_second_bucket", **labels, le="20.0") == 0
    assert value(samples, "dvai_decode_rate_tokens_per_second_bucket", **labels, le="75.0") == 2
    # the first token comes one token interval (25 ms) after the start: not in the 5 ms bucket
    assert value(samples, "dvai_time_to_first_token_seconds_bucket", **labels, le="0.005") == 0
    assert value(samples, "dvai_time_to_first_token_seconds_bucket", **labels, le="1.0") == 2


async def test_queue_depth_rises_while_requests_wait(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    async with Node(sim_config(tmp_path, tok_per_s=100)) as node:
        idle = await scrape(session, node)
        assert value(idle, "dvai_queue_depth", model="sim") == 0
        assert value(idle, "dvai_queue_limit", model="sim") == 16
        assert value(idle, "dvai_model_state", model="sim", state="ready") == 1

        async def one() -> int:
            async with session.post(root(node) + CHAT, json=chat_body(30)) as response:
                await response.read()
                return response.status

        tasks = [asyncio.create_task(one()) for _ in range(3)]
        seen: list[float] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and 3.0 not in seen:
            depth = value(await scrape(session, node), "dvai_queue_depth", model="sim")
            assert depth is not None
            seen.append(depth)
            await asyncio.sleep(0.01)
        assert 3.0 in seen, seen  # one running, two waiting
        assert await asyncio.gather(*tasks) == [200, 200, 200]
        after = await scrape(session, node)
        assert value(after, "dvai_queue_depth", model="sim") == 0


async def test_a_client_that_leaves_mid_stream_is_counted_as_499(tmp_path: Path,
                                                                 session: aiohttp.ClientSession) -> None:
    async with Node(sim_config(tmp_path, tok_per_s=50)) as node:
        async with session.post(root(node) + CHAT, json=chat_body(500, stream=True)) as response:
            assert response.status == 200
            await response.content.readline()  # the stream has started; now hang up
        labels = {"endpoint": CHAT, "method": "POST", "status": "499", "served_by": "local"}
        deadline = time.monotonic() + 5
        samples: Samples = {}
        while time.monotonic() < deadline:
            samples = await scrape(session, node)
            if value(samples, "dvai_http_requests_total", **labels):
                break
            await asyncio.sleep(0.02)
        assert value(samples, "dvai_http_requests_total", **labels) == 1
        assert value(samples, "dvai_http_errors_total", endpoint=CHAT, code="client_closed_request") == 1


# --------------------------------------------------------------------------
# Isolation and bounded labels


async def test_two_nodes_in_one_process_do_not_share_metrics(tmp_path: Path,
                                                             session: aiohttp.ClientSession) -> None:
    async with Node(sim_config(tmp_path / "a")) as a, Node(sim_config(tmp_path / "b")) as b:
        async with session.post(root(a) + CHAT, json=chat_body(4)) as response:
            assert response.status == 200
        assert a.context is not None and a.context.metrics is not None
        a.context.metrics.offload_started("dv-peer")
        seen_a, seen_b = await scrape(session, a), await scrape(session, b)
        id_a, id_b = a.device_id, b.device_id
    assert value(seen_a, "dvai_completion_tokens_total", model="sim", served_by="local") == 4
    assert series(seen_b, "dvai_completion_tokens_total") == {}
    assert series(seen_b, "dvai_http_requests_total") == {}
    assert series(seen_b, "dvai_offload_requests_total") == {}
    ids_a = {dict(k)["device_id"] for k in series(seen_a, "dvai_node_info")}
    ids_b = {dict(k)["device_id"] for k in series(seen_b, "dvai_node_info")}
    assert ids_a == {id_a} and ids_b == {id_b} and id_a != id_b


async def test_label_cardinality_stays_bounded(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    async with Node(sim_config(tmp_path)) as node:
        for index in range(150):
            bogus = f"/v1/{uuid.uuid4().hex}/{index}"
            async with session.request("GET" if index % 2 else "PROPFIND", root(node) + bogus) as response:
                assert response.status in (404, 405)
            async with session.post(root(node) + CHAT, json=chat_body(1, model=f"m{index}")) as response:
                assert response.status == 404
        async with session.get(root(node) + "/not-under-v1") as response:
            assert response.status == 404
        assert node.context is not None and node.context.metrics is not None
        for index in range(3 * MAX_METRIC_PEER_LABELS):
            node.context.metrics.offload_started(f"dv-{index}")
            node.context.metrics.offload_finished(f"dv-{index}", ok=index % 3 != 0, tokens=2)
        samples = await scrape(session, node)
    requests = series(samples, "dvai_http_requests_total")
    assert {dict(k)["endpoint"] for k in requests} == {UNMATCHED, CHAT}
    assert {dict(k)["method"] for k in requests} == {"GET", OTHER, "POST"}
    assert sum(requests.values()) == 300  # the request outside /v1/ is not counted
    assert {dict(k)["model"] for k in series(samples, "dvai_prompt_tokens_total")} <= {"sim"}
    peers = {dict(k)["peer"] for k in series(samples, "dvai_offload_requests_total")}
    assert len(peers) == MAX_METRIC_PEER_LABELS + 1 and OTHER in peers
    assert value(samples, "dvai_offload_requests_total", peer=OTHER) == 2 * MAX_METRIC_PEER_LABELS
    total = sum(series(samples, "dvai_offload_requests_total").values())
    assert total == 3 * MAX_METRIC_PEER_LABELS
    assert sum(series(samples, "dvai_offload_failures_total").values()) == MAX_METRIC_PEER_LABELS
    assert sum(series(samples, "dvai_offload_tokens_total").values()) == 6 * MAX_METRIC_PEER_LABELS
    assert set(series(samples, "dvai_offload_in_flight").values()) == {0}


# --------------------------------------------------------------------------
# Offload hooks and where-served (the router's integration surface, with plain data)


def test_offload_hooks_count_requests_failures_tokens_and_in_flight() -> None:
    metrics = NodeMetrics(device_id="dv-self")
    metrics.offload_started("dv-fast")
    metrics.offload_started("dv-fast")
    samples = parse(metrics.render().decode())
    assert value(samples, "dvai_offload_in_flight", peer="dv-fast") == 2
    metrics.offload_finished("dv-fast", ok=True, tokens=40)
    metrics.offload_finished("dv-fast", ok=False, tokens=3)
    metrics.offload_finished("dv-fast", ok=False, tokens=0)  # unmatched finish: in flight stays at 0
    samples = parse(metrics.render().decode())
    assert value(samples, "dvai_offload_requests_total", peer="dv-fast") == 2
    assert value(samples, "dvai_offload_failures_total", peer="dv-fast") == 2
    assert value(samples, "dvai_offload_tokens_total", peer="dv-fast") == 43
    assert value(samples, "dvai_offload_in_flight", peer="dv-fast") == 0


def test_served_by_a_peer_is_told_apart_from_local() -> None:
    metrics = NodeMetrics(device_id="dv-self")
    served = {"model": "big-model", "prompt_tokens": 3, "completion_tokens": 9,
              "first_token_s": 0.2, "decode_tok_per_s": 55.0}

    def record(served_by: str, error_code: str | None = None) -> RequestRecord:
        r = RequestRecord(method="POST", endpoint=CHAT, route=CHAT, status=200, error_code=error_code)
        r.served(served_by, **served)  # type: ignore[arg-type]
        return r

    metrics.observe_request(record("dv-self"))  # our own id: local
    metrics.observe_request(record("dv-peer"))
    metrics.observe_request(record("dv-peer", "upstream_error"))
    samples = parse(metrics.render().decode())
    assert value(samples, "dvai_http_requests_total", endpoint=CHAT, method="POST", status="200",
                 served_by="local") == 1
    assert value(samples, "dvai_http_requests_total", endpoint=CHAT, method="POST", status="200",
                 served_by="peer") == 2
    assert value(samples, "dvai_http_errors_total", endpoint=CHAT, code="upstream_error") == 1
    # a model this node does not know: "other" when local, its own label (capped) when a peer served it
    assert value(samples, "dvai_completion_tokens_total", model=OTHER, served_by="local") == 9
    assert value(samples, "dvai_completion_tokens_total", model="big-model", served_by="peer") == 18
    assert value(samples, "dvai_decode_rate_tokens_per_second_count", model="big-model", served_by="peer") == 2


def test_hostile_details_are_ignored_not_crashed() -> None:
    metrics = NodeMetrics(device_id="dv-self")
    for junk in ({"model_served": ["x"], "prompt_tokens": "9"}, {"model_served": "m", "prompt_tokens": True,
                 "completion_tokens": -4, "first_token_s": float("nan"), "decode_tok_per_s": float("inf")}):
        metrics.observe_request(RequestRecord(method="POST", endpoint=CHAT, route=CHAT, status=200,
                                              **junk))  # type: ignore[arg-type]
    samples = parse(metrics.render().decode())
    assert series(samples, "dvai_prompt_tokens_total") == {}
    assert series(samples, "dvai_completion_tokens_total") == {}
    assert series(samples, "dvai_time_to_first_token_seconds_count") == {}
    assert value(samples, "dvai_http_requests_total", endpoint=CHAT, method="POST", status="200",
                 served_by="local") == 2


def test_bounded_labels_keep_the_first_values_and_cut_long_ones() -> None:
    labels = BoundedLabels(2)
    assert [labels(v) for v in ("a", "b", "c", "a", "b", "c")] == ["a", "b", OTHER, "a", "b", OTHER]
    assert len(BoundedLabels(1)("x" * 1000)) == 128


# --------------------------------------------------------------------------
# Access: the node's exposure policy


async def test_metrics_follow_the_exposure_policy(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    # trust_loopback = false: our loopback test client is treated as a caller from the network.
    security = {"require_pairing": True, "trust_loopback": False}
    async with Node(sim_config(tmp_path / "closed", security=security)) as node:
        async with session.get(root(node) + "/metrics") as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "signature_required"
        assert node.context is not None and node.context.pairings is not None
        key = b"k" * 32
        await node.context.pairings.add(Pairing(peer_device_id="dv-peer", peer_device_name="Peer",
                                                our_app_id="dv-me", peer_app_id="dv-peer", key=key, via="static", paired_at=0,
                                                role="mutual"))
        headers = sign_request_headers(key, "dv-peer", "dv-peer", "GET", "/metrics", b"")
        async with session.get(root(node) + "/metrics", headers=headers) as response:
            assert response.status == 200  # a paired device may read them
            assert value(parse(await response.text()), "dvai_paired_devices") == 1
    async with Node(sim_config(tmp_path / "open", security={**security, "public_metrics": True})) as node:
        async with session.get(root(node) + "/metrics") as response:
            assert response.status == 200  # opted in: a Prometheus server on another host
        async with session.post(root(node) + CHAT, json=chat_body(2)) as response:
            assert response.status == 401  # …and only the metrics became public
        samples = await scrape(session, node)
    assert value(samples, "dvai_http_requests_total", endpoint=CHAT, method="POST", status="401",
                 served_by="local") == 1
    assert value(samples, "dvai_http_errors_total", endpoint=CHAT, code="signature_required") == 1


async def test_peers_by_state_appear_once_discovery_runs(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    async with Node(sim_config(tmp_path / "off")) as node:
        assert series(await scrape(session, node), "dvai_peers") == {}  # offload off: no peer table
    offload = {"enabled": True, "discover_lan": False}
    async with Node(sim_config(tmp_path / "on", offload=offload)) as node:
        samples = await scrape(session, node)
    assert series(samples, "dvai_peers") == {
        frozenset({("state", state)}): 0 for state in ("pending", "reachable", "unreachable", "flagged")
    }


# --------------------------------------------------------------------------
# Real engine


@pytest.mark.engine
async def test_token_counters_match_usage_on_the_real_engine(tmp_path: Path, default_model: Path,
                                                             session: aiohttp.ClientSession) -> None:
    config = load_config(env={}, overrides={"state_dir": str(tmp_path), "http_base_port": 0})
    async with Node(config) as node:
        model = config.default_model_id
        async with session.post(root(node) + CHAT, json=chat_body(6, model=model)) as response:
            assert response.status == 200
            plain = (await response.json())["usage"]
        async with session.post(root(node) + CHAT, json=chat_body(6, stream=True, model=model)) as response:
            assert response.status == 200
            streamed = await stream_usage(response)
        samples = await scrape(session, node)
    labels = {"model": model, "served_by": "local"}
    assert value(samples, "dvai_prompt_tokens_total", **labels) == plain["prompt_tokens"] + streamed["prompt_tokens"]
    assert value(samples, "dvai_completion_tokens_total", **labels) == (
        plain["completion_tokens"] + streamed["completion_tokens"])
    assert value(samples, "dvai_time_to_first_token_seconds_count", **labels) == 2
    assert value(samples, "dvai_model_state", model=model, state="ready") == 1
