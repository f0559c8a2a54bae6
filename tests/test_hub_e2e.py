"""The hub's acceptance test with real node processes: 30 devices × 3 apps, keys, signatures,
quotas, revocation, fairness under a flood, and a restart.

Load runs on SIMULATED engines (``engine = "simulated"``: filler tokens at a set rate; this is
about admission, attribution, scheduling and accounting, not generation); one request path runs
on the real engine with the default model. Devices that sign are paired through the real
handshake (allowlist policy); the others call with per-device API keys (``Authorization: Bearer``)
minted through the admin API.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from node.identity import DeviceIdentity
from node.pairing.handshake import pair_with
from node.pairing.store import Pairing, PairingStore
from node.security import sign_request_headers, sign_with_pairing

from .conftest import NodeProcess, start_node_process

pytestmark = pytest.mark.slow

APPS = ("com.acme.chat", "com.acme.notes", "com.acme.mail")
CHAT, NOTES, MAIL = APPS
DEVICES = 30
SIGNERS = 9
"""devices 0..8 are paired and sign for one app each (several apps paired on one device, each with
its own key: tests/test_hub_apps_e2e.py); every other (device, app) calls with an API key minted for it."""
RPM_PER_DEVICE = 4
"""notes: requests per minute, per device."""
MAIL_TOKENS_PER_DAY = 40
"""mail: tokens per UTC day on the ``metered`` model."""


def hub_config(allowlist: list[str]) -> str:
    return f"""
generation_timeout = 120

[models.sim]
engine = "simulated"
simulated_tok_per_s = 1000.0
queue_depth = 128

[models.metered]
engine = "simulated"
simulated_tok_per_s = 1000.0

[models.gemma3-270m]
threads = 1

[security]
require_pairing = true
pairing_policy = "allowlist"
pairing_allowlist = {json.dumps(allowlist)}
handshake_rate_per_minute = 600

[[hub.quotas]]
app_id = "{NOTES}"
device_id = "*"
requests_per_minute = {RPM_PER_DEVICE}

[[hub.quotas]]
app_id = "{MAIL}"
model = "metered"
tokens_per_day = {MAIL_TOKENS_PER_DAY}
"""


@dataclass
class Caller:
    """One (device, app): signs with its device's pairing, or calls with its own API key."""

    device: int
    app: str
    pairing: Pairing | None = None
    device_id: str = ""
    key: str = ""
    key_id: str = ""

    @property
    def audit_peer(self) -> str:
        return self.device_id if self.pairing is not None else f"apikey:{self.key_id}"

    def headers(self, path: str, body: bytes, *, app: str | None = None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": f"req-{uuid.uuid4().hex}"}
        if self.pairing is not None:
            headers.update(sign_with_pairing(self.pairing, self.device_id, "POST", path, body))
            if app is not None:  # claim another app: the signature covers the headers' app id
                headers.update(sign_request_headers(self.pairing.key, self.device_id, app, "POST", path, body))
        else:
            headers["Authorization"] = f"Bearer {self.key}"
            if app is not None:
                headers["X-DVAI-App-Id"] = app
        return headers


async def post(session: aiohttp.ClientSession, node: NodeProcess, caller: Caller, body: dict[str, Any], *,
               path: str = "/v1/chat/completions", app: str | None = None) -> tuple[int, dict[str, Any], str,
                                                                                   dict[str, str]]:
    raw = json.dumps(body).encode()
    headers = caller.headers(path, raw, app=app)
    async with session.post(node.root + path, data=raw, headers=headers) as response:
        return response.status, await response.json(), headers["X-Request-Id"], dict(response.headers)


def chat(model: str = "sim", max_tokens: int = 2) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


@pytest.mark.engine
async def test_thirty_devices_three_apps_attribution_isolation_quotas_revocation_and_restart(
        tmp_path: Path) -> None:
    identities = [DeviceIdentity.generate() for _ in range(DEVICES)]
    config = hub_config([identities[d].device_id for d in range(SIGNERS)])
    node = start_node_process(tmp_path / "hub", config_text=config)
    callers: dict[tuple[int, str], Caller] = {}
    try:
        async with aiohttp.ClientSession() as session:
            # -- pairing (real handshakes) and keys (admin API) -------------------------------
            for d in range(SIGNERS):
                store = PairingStore(tmp_path / f"device{d}" / "pairings.json")
                await asyncio.sleep(0.15)  # under the handshake rate (a burst of 5 per address)
                pairing = await pair_with(session, node.root, identity=identities[d], my_device_name=f"device {d}",
                                          app_id=APPS[d % 3], store=store)
                callers[(d, APPS[d % 3])] = Caller(d, APPS[d % 3], pairing, identities[d].device_id)
            for d in range(DEVICES):
                for app in APPS:
                    if (d, app) in callers:
                        continue
                    async with session.post(node.root + "/v1/dvai/keys",
                                            json={"appId": app, "name": f"device-{d}"}) as response:
                        assert response.status == 201
                        minted = await response.json()
                    callers[(d, app)] = Caller(d, app, key=minted["key"], key_id=minted["id"])

            # -- 90 concurrent requests, each attributed to its app and device ---------------
            results = await asyncio.gather(*(post(session, node, c, chat()) for c in callers.values()))
            assert [status for status, *_ in results] == [200] * len(callers)
            expected = {rid: (c.app, c.audit_peer) for c, (_, _, rid, _) in zip(callers.values(), results,
                                                                                 strict=True)}
            rows = await audit(session, node)
            seen = {r["requestId"]: (r["appId"], r["peerDeviceId"]) for r in rows if r["requestId"] in expected}
            assert seen == expected

            # -- one app's credentials never act for another ---------------------------------
            signer = callers[(0, CHAT)]
            status, body, _, _ = await post(session, node, signer, chat(), app=NOTES)
            assert status == 401, body  # device 0 is paired for chat only
            notes_key = callers[(SIGNERS, NOTES)]
            status, body, rid, _ = await post(session, node, notes_key, chat(), app=CHAT)  # notes' key claims chat
            assert status == 401 and body["error"]["code"] == "incomplete_signature_headers"
            row = next(r for r in await audit(session, node) if r["requestId"] == rid)
            assert row["appId"] != CHAT and row["status"] == 401

            # -- quotas hit exactly at their limits ------------------------------------------
            # notes, per device per minute: the device has used 1 of its 4 (the refused claim did not count)
            statuses = [(await post(session, node, notes_key, chat()))[0] for _ in range(RPM_PER_DEVICE - 1)]
            assert statuses == [200] * (RPM_PER_DEVICE - 1)
            status, body, _, headers = await post(session, node, notes_key, chat())
            assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
            assert int(headers["Retry-After"]) >= 1
            assert (await post(session, node, callers[(SIGNERS + 1, NOTES)], chat()))[0] == 200  # its own count
            assert (await post(session, node, callers[(SIGNERS, MAIL)], chat()))[0] == 200  # another app
            # mail, tokens per day on "metered": each answer costs the same, counted exactly
            mail = callers[(SIGNERS + 2, MAIL)]
            status, body, _, _ = await post(session, node, mail, chat("metered", 5))
            assert status == 200
            cost = body["usage"]["total_tokens"]
            allowed = math.ceil(MAIL_TOKENS_PER_DAY / cost)  # admitted while the day's total is below the budget
            for _ in range(allowed - 1):
                assert (await post(session, node, callers[(SIGNERS + 3, MAIL)], chat("metered", 5)))[0] == 200
            status, body, _, headers = await post(session, node, mail, chat("metered", 5))
            assert status == 429 and body["error"]["code"] == "insufficient_quota" and int(headers["Retry-After"]) > 0
            assert (await post(session, node, mail, chat("sim")))[0] == 200  # the rule is for "metered" only

            # -- revoking one app's key leaves the device's other apps working ----------------
            revoked = callers[(SIGNERS + 4, CHAT)]
            async with session.delete(node.root + f"/v1/dvai/keys/{revoked.key_id}") as response:
                assert response.status == 200
            status, body, _, _ = await post(session, node, revoked, chat())
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            for app in (NOTES, MAIL):
                assert (await post(session, node, callers[(SIGNERS + 4, app)], chat()))[0] == 200
            assert (await post(session, node, callers[(SIGNERS + 5, CHAT)], chat()))[0] == 200

            # -- one request on the real engine, by key, counted like the others --------------
            real = callers[(SIGNERS + 6, CHAT)]
            client = openai.AsyncOpenAI(base_url=node.base_url, api_key=real.key, max_retries=0)
            reply = await client.chat.completions.create(
                model="gemma3-270m", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
            await client.close()
            assert reply.usage is not None and reply.usage.completion_tokens > 0
            usage_before = await usage(session, node)
            real_row = usage_before[(CHAT, real.audit_peer, "gemma3-270m")]
            assert real_row["completionTokens"] == reply.usage.completion_tokens
            async with session.get(node.root + "/v1/dvai/pairings") as response:
                pairings_before = sorted(p["peerDeviceId"] for p in (await response.json())["data"])
            assert len(pairings_before) == SIGNERS
    finally:
        node.stop()

    # -- a restart keeps usage, pairings, revocations and the day's token budget --------------
    again = start_node_process(tmp_path / "hub", config_text=config)
    try:
        async with aiohttp.ClientSession() as session:
            assert await usage(session, again) == usage_before
            async with session.get(again.root + "/v1/dvai/pairings") as response:
                assert sorted(p["peerDeviceId"] for p in (await response.json())["data"]) == pairings_before
            assert (await post(session, again, callers[(0, CHAT)], chat()))[0] == 200  # its pairing still signs
            assert (await post(session, again, revoked, chat()))[0] == 401
            status, body, _, _ = await post(session, again, mail, chat("metered", 5))
            assert status == 429 and body["error"]["code"] == "insufficient_quota"
    finally:
        again.stop()


async def audit(session: aiohttp.ClientSession, node: NodeProcess) -> list[dict[str, Any]]:
    async with session.get(node.root + "/v1/dvai/audit?limit=10000") as response:
        assert response.status == 200
        rows: list[dict[str, Any]] = (await response.json())["data"]
        return rows


async def usage(session: aiohttp.ClientSession, node: NodeProcess) -> dict[tuple[str, str, str], dict[str, Any]]:
    await asyncio.sleep(0.3)  # rows are written by the accounting thread just after the answer
    async with session.get(node.root + "/v1/dvai/usage?days=1") as response:
        assert response.status == 200
        return {(r["appId"], r["deviceId"], r["model"]): r for r in (await response.json())["data"]}


# -- fairness ------------------------------------------------------------------------------

FAIR = """
[models.sim]
engine = "simulated"
simulated_tok_per_s = 200.0
queue_depth = 8
"""
CALM_TOKENS = 30
"""mail's requests: 30 tokens at 200 tok/s, 150 ms of generation."""
FLOOD_TOKENS = 5
"""chat's flood: 25 ms requests from more workers than the queue has places."""
FLOOD_WORKERS = 11
CALM_REQUESTS = 20
CALM_INTERVAL_S = 0.25


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


async def test_one_app_flooding_does_not_raise_another_apps_p95_latency_by_more_than_2x(tmp_path: Path) -> None:
    node = start_node_process(tmp_path / "fair", config_text=FAIR)
    try:
        async with aiohttp.ClientSession() as session:
            keys = {}
            for app in (CHAT, MAIL):
                async with session.post(node.root + "/v1/dvai/keys", json={"appId": app}) as response:
                    keys[app] = (await response.json())["key"]

            async def call(app: str, max_tokens: int) -> tuple[int, float]:
                started = time.perf_counter()
                async with session.post(node.base_url + "/chat/completions", json=chat(max_tokens=max_tokens),
                                        headers={"Authorization": f"Bearer {keys[app]}"}) as response:
                    await response.read()
                    return response.status, time.perf_counter() - started

            async def calm() -> list[tuple[int, float]]:
                """mail at a fixed rate: each request starts on schedule, whatever the others do."""
                start = time.perf_counter()
                tasks = []
                for i in range(CALM_REQUESTS):
                    await asyncio.sleep(max(0.0, start + i * CALM_INTERVAL_S - time.perf_counter()))
                    tasks.append(asyncio.create_task(call(MAIL, CALM_TOKENS)))
                return list(await asyncio.gather(*tasks))

            await call(MAIL, 2)  # warm the path
            alone = await calm()

            flooding = True
            flood_statuses: list[int] = []

            async def flood() -> None:
                while flooding:
                    status, _ = await call(CHAT, FLOOD_TOKENS)
                    flood_statuses.append(status)
                    if status == 503:
                        await asyncio.sleep(0.1)

            workers = [asyncio.create_task(flood()) for _ in range(FLOOD_WORKERS)]
            await asyncio.sleep(0.5)
            during = await calm()
            flooding = False
            await asyncio.gather(*workers)
    finally:
        node.stop()
    alone_p95 = p95([s for _, s in alone])
    during_p95 = p95([s for _, s in during])
    print(f"\nmail p95 alone {alone_p95 * 1000:.0f} ms, while chat floods {during_p95 * 1000:.0f} ms "
          f"({during_p95 / alone_p95:.2f}x); chat answered {flood_statuses.count(200)} x 200, "
          f"{flood_statuses.count(503)} x 503")
    assert [s for s, _ in alone] == [200] * CALM_REQUESTS
    assert [s for s, _ in during] == [200] * CALM_REQUESTS  # never refused: it takes a flooder's place
    assert 503 in flood_statuses and 200 in flood_statuses  # the flood was real and was pushed back
    assert during_p95 <= 2 * alone_p95
