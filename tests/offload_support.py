"""Helpers for the offload tests and benchmarks: node configs, pairing, SSE reading, a stub peer.

Everything runs on loopback. Nodes are real ``dvai-node serve`` processes; "slow" and
"fast" nodes use the SIMULATED engine at a set token rate, and say so in their names.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from node.identity import load_or_create_identity

PEERS_FILE_ENV = "OFFLOAD_TEST_PEERS_FILE"
"""Environment variable naming the JSON file ``discover_from_file`` reads (not ``DVAI_*``:
those are config keys)."""


def device_id_for(state_dir: Path) -> str:
    """Create the node's identity ahead of its first start, to know its device id."""
    return load_or_create_identity(state_dir).device_id


def simulated_models(rates: Mapping[str, float]) -> str:
    """``[models.<id>]`` tables of SIMULATED engines at the given tok/s."""
    return "".join(f'[models.{model}]\nengine = "simulated"\nsimulated_tok_per_s = {rate}\n\n'
                   for model, rate in rates.items())


def node_config(
    models: str,
    *,
    offload: bool = True,
    threshold: float = 10.0,
    allow: Sequence[str] = (),
    custom_discovery: bool = False,
    known_peers: Sequence[str] = (),
    extra_offload: str = "",
) -> str:
    """A node config for tests: loopback, no mDNS, no start-up probe, fast health checks."""
    text = models
    if offload:
        text += (
            "[offload]\nenabled = true\ndiscover_lan = false\nprobe_on_start = false\n"
            f"min_local_capability = {threshold}\nhealth_interval = 0.5\nunreachable_after = 2.0\n"
            "verify_timeout = 8.0\nforward_read_timeout = 5.0\n"
        )
        if custom_discovery:
            text += 'custom_discovery = "tests.offload_support:discover_from_file"\ncustom_discovery_interval = 60\n'
        text += extra_offload
        for url in known_peers:
            text += f'[[offload.known_peers]]\nbase_url = "{url}"\n'
    if allow:
        listed = ", ".join(f'"{a}"' for a in allow)
        text += f'[security]\npairing_policy = "allowlist"\npairing_allowlist = [{listed}]\n'
    return text


def discover_from_file() -> list[dict[str, Any]]:
    """``custom_discovery`` for tests: the peers (with claimed capabilities) in a JSON file."""
    path = os.environ.get(PEERS_FILE_ENV)
    if not path:
        return []
    return list(json.loads(Path(path).read_text()))


def write_forged_capability(state_dir: Path, model: str, tok_per_s: float) -> None:
    """A stored probe score for a SIMULATED model: the node believes it is this fast (or slow)."""
    record = {"modelId": model, "tokPerS": tok_per_s, "promptTokPerS": None, "measuredAt": time.time(),
              "libraryVersion": "simulated", "source": "probe", "samples": 32, "modelSizeBytes": 0}
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "capability.json").write_text(json.dumps({"version": 1, "scores": [record]}))


async def pair(session: aiohttp.ClientSession, node_root: str, target_base_url: str) -> dict[str, Any]:
    """Make ``node`` pair with ``target`` (what ``dvai-node pair <url>`` does), via its admin API."""
    async with session.post(node_root + "/v1/dvai/pairings", json={"url": target_base_url}) as response:
        body = await response.json()
        assert response.status == 200, body
        return dict(body)


async def wait_until(predicate: Any, within: float, interval: float = 0.05) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {within} s")


async def peer_state(session: aiohttp.ClientSession, node_root: str, device_id: str) -> str | None:
    async with session.get(node_root + "/v1/dvai/peers") as response:
        for peer in (await response.json())["data"]:
            if peer["deviceId"] == device_id:
                return str(peer["state"])
    return None


async def offload_status(session: aiohttp.ClientSession, node_root: str) -> dict[str, Any]:
    async with session.get(node_root + "/v1/dvai/offload") as response:
        assert response.status == 200
        return dict(await response.json())


@dataclass
class StreamResult:
    status: int
    headers: Mapping[str, str]
    events: list[Any] = field(default_factory=list)
    """parsed JSON events; the closing ``[DONE]`` as the string ``"[DONE]"``."""
    times: list[float] = field(default_factory=list)
    """arrival time (perf_counter) of each event."""
    started: float = 0.0
    body: Any = None

    @property
    def text(self) -> str:
        out = []
        for event in self.events:
            if isinstance(event, dict) and event.get("choices"):
                choice = event["choices"][0]
                out.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
        return "".join(out)

    @property
    def served_by(self) -> str | None:
        return self.headers.get("X-DVAI-Served-By")

    @property
    def content_times(self) -> list[float]:
        return [t for e, t in zip(self.events, self.times, strict=True) if isinstance(e, dict) and e.get("choices")
                and ((e["choices"][0].get("delta") or {}).get("content") or e["choices"][0].get("text"))]


async def post_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      headers: Mapping[str, str] | None = None, *, stop_after: int | None = None) -> StreamResult:
    """POST and read the SSE answer event by event (or the JSON error); ``stop_after`` events: close early."""
    started = time.perf_counter()
    async with session.post(url, json={**body, "stream": True}, headers=dict(headers or {})) as response:
        result = StreamResult(response.status, dict(response.headers), started=started)
        if response.status != 200:
            result.body = await response.json()
            return result
        buffer = b""
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            buffer += chunk
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                assert raw.startswith(b"data: "), raw
                data = raw[len(b"data: "):]
                result.events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
                result.times.append(now)
            if stop_after is not None and len(result.events) >= stop_after:
                response.close()
                break
        assert not buffer.strip(), f"a torn event at the end of the stream: {buffer!r}"
    return result


def chat(model: str, content: str = "Say something.", max_tokens: int = 8) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


# --------------------------------------------------------------------------------------
# A stub peer: answers health (with identity proofs) and pairing like a node, and serves
# every generation with a single token, so a verification probe of it is inconclusive.


class InconclusiveStubPeer:
    """Runs in its own thread and event loop, so any test (sync or async) can use it."""

    def __init__(self, state_dir: Path, model: str) -> None:
        from node.identity import open_node_identity

        self._handle = open_node_identity(state_dir, "stub-peer")
        self.identity = self._handle.identity
        self.model = model
        self.requests: list[tuple[str, bool]] = []
        """(path, carried the hop marker) of every generation request."""
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._handle.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/dvai/health", self._health)
        app.router.add_post("/v1/dvai/handshake", self._handshake)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001

    async def _health(self, request: web.Request) -> web.Response:
        from node.identity import make_health_proof

        body: dict[str, Any] = {
            "status": "ok", "version": "0.1.0", "uptimeS": 1.0, "deviceId": self.device_id,
            "deviceName": "stub-peer", "instanceId": self.identity.instance_id,
            "models": [{"id": self.model, "loaded": True, "queueDepth": 0}],
        }
        challenge = request.query.get("challenge")
        if challenge:
            body["identityProof"] = make_health_proof(self.identity, challenge)
        return web.json_response(body)

    async def _handshake(self, request: web.Request) -> web.Response:
        import secrets

        from node.pairing import encode_key

        body = await request.json()
        return web.json_response({"paired": True, "pairedAt": int(time.time() * 1000), "via": "lan-handshake",
                                  "pairingKey": encode_key(secrets.token_bytes(32)),
                                  "peerDeviceId": body["peerDeviceId"]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, "X-DVAI-Hop" in request.headers))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "one",
                                                                      "finish_reason": None}]}
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response
