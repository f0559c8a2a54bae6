"""The hub's acceptance test with real node processes: 30 devices × 3 apps, per-app pairing, keys,
signatures, quotas, revocation, fairness under a flood, and a restart.

Load runs on SIMULATED engines (``engine = "simulated"``: filler tokens at a set rate; this is
about admission, attribution, scheduling and accounting, not generation); one request path runs
on the real engine with the default model. Ten devices pair each of the three apps through the
real LAN handshake (allowlist policy; one handshake and one key per (device, app)) and sign every
request with that app's key; the other twenty call with per-(device, app) API keys
(``Authorization: Bearer``) minted through the admin API. Signed and Bearer requests run
concurrently.
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

from node.common.errors import RateLimitedError
from node.identity import DeviceIdentity
from node.pairing.handshake import pair_with
from node.pairing.store import Pairing, PairingStore
from node.security import sign_request_headers, sign_with_pairing

from .conftest import NodeProcess, start_node_process

pytestmark = pytest.mark.slow

APPS = ("com.acme.chat", "com.acme.notes", "com.acme.mail")
CHAT, NOTES, MAIL = APPS
DEVICES = 30
SIGNERS = 10
"""devices 0..9 pair all three apps (a handshake and a key per (device, app)) and sign; every
(device, app) of devices 10..29 calls with an API key minted for it."""
HANDSHAKE_RATE_PER_MINUTE = 6000
"""the node's handshake rate per address (every device here is 127.0.0.1): 100 a second after a
burst of 5, so the 30 handshakes run at once, paced and retried on 429."""
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
handshake_rate_per_minute = {HANDSHAKE_RATE_PER_MINUTE}

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
    """One (device, app): signs with the pairing of that app on its device, or calls with its own API key."""

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
        """Signed or Bearer headers; ``app`` claims another app with this caller's credential."""
        headers = {"Content-Type": "application/json", "X-Request-Id": f"req-{uuid.uuid4().hex}"}
        if self.pairing is not None:
            if app is None:
                headers.update(sign_with_pairing(self.pairing, self.device_id, "POST", path, body))
            else:  # this app's key signs headers that name another app
                headers.update(sign_request_headers(self.pairing.key, self.device_id, app, "POST", path, body))
        else:
            headers["Authorization"] = f"Bearer {self.key}"
            if app is not None:
                headers["X-DVAI-App-Id"] = app
        return headers


Answer = tuple[int, dict[str, Any], str, dict[str, str]]
"""status, JSON body, the request's X-Request-Id, response headers."""


async def post(session: aiohttp.ClientSession, node: NodeProcess, caller: Caller, body: dict[str, Any], *,
               path: str = "/v1/chat/completions", app: str | None = None) -> Answer:
    raw = json.dumps(body).encode()
    headers = caller.headers(path, raw, app=app)
    async with session.post(node.root + path, data=raw, headers=headers) as response:
        return response.status, await response.json(), headers["X-Request-Id"], dict(response.headers)


def chat(model: str = "sim", max_tokens: int = 2) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def assert_refused(answer: Answer, status: int, code: str) -> None:
    """An OpenAI-shaped error with this status and code."""
    got, body, _, _ = answer
    assert got == status, body
    error = body["error"]
    assert error["code"] == code and error["type"] and error["message"], body


async def pair_app(session: aiohttp.ClientSession, node: NodeProcess, identity: DeviceIdentity,
                   store: PairingStore, app: str, *, delay_s: float) -> Pairing:
    """The real LAN handshake of ``app`` on the device ``identity``, started after ``delay_s``;
    retried shortly when the node's handshake rate refuses it (its Retry-After is whole seconds)."""
    await asyncio.sleep(delay_s)
    for _ in range(100):
        try:
            return await pair_with(session, node.root, identity=identity, my_device_name=f"device {identity.device_id}",
                                   app_id=app, store=store)
        except RateLimitedError:
            await asyncio.sleep(0.02)
    raise AssertionError(f"the handshake of {app} never got under the node's handshake rate")


async def mint_key(session: aiohttp.ClientSession, node: NodeProcess, device: int, app: str) -> Caller:
    async with session.post(node.root + "/v1/dvai/keys", json={"appId": app, "name": f"device-{device}"}) as response:
        assert response.status == 201
        minted = await response.json()
    return Caller(device, app, key=minted["key"], key_id=minted["id"])


@pytest.mark.engine
async def test_thirty_devices_three_apps_attribution_isolation_quotas_revocation_and_restart(
        tmp_path: Path) -> None:
    identities = [DeviceIdentity.generate() for _ in range(DEVICES)]
    config = hub_config([identities[d].device_id for d in range(SIGNERS)])
    node = start_node_process(tmp_path / "hub", config_text=config)
    callers: dict[tuple[int, str], Caller] = {}
    try:
        async with aiohttp.ClientSession() as session:
            # -- pairing (a real handshake per (device, app), all at once) and keys (admin API) --
            stores = [PairingStore(tmp_path / f"device{d}" / "pairings.json") for d in range(SIGNERS)]
            paired = [(d, app) for d in range(SIGNERS) for app in APPS]
            pairings = await asyncio.gather(*(
                pair_app(session, node, identities[d], stores[d], app, delay_s=0.01 * i)
                for i, (d, app) in enumerate(paired)))
            for (d, app), pairing in zip(paired, pairings, strict=True):
                assert pairing.our_app_id == app
                callers[(d, app)] = Caller(d, app, pairing, identities[d].device_id)
            assert len({p.key for p in pairings}) == len(paired)  # one key per (device, app)
            minted = await asyncio.gather(*(mint_key(session, node, d, app)
                                            for d in range(SIGNERS, DEVICES) for app in APPS))
            callers.update(((c.device, c.app), c) for c in minted)
            signed = [c for c in callers.values() if c.pairing is not None]

            # -- 90 concurrent requests, signed and Bearer, each attributed to its app and device --
            results = await asyncio.gather(*(post(session, node, c, chat()) for c in callers.values()))
            assert [status for status, *_ in results] == [200] * len(callers)
            request_of = {(c.device, c.app): rid for c, (_, _, rid, _) in zip(callers.values(), results, strict=True)}
            expected = {request_of[(c.device, c.app)]: (c.app, c.audit_peer) for c in callers.values()}
            rows = await audit(session, node)
            seen = {r["requestId"]: (r["appId"], r["peerDeviceId"]) for r in rows if r["requestId"] in expected}
            assert seen == expected

            # -- one app's credentials never act for another ---------------------------------
            # notes' pairing key on device 0 signs as chat, which device 0 has paired too
            chat_signer = callers[(0, CHAT)]
            refused = await post(session, node, callers[(0, NOTES)], chat(), app=CHAT)
            assert_refused(refused, 401, "bad_signature")
            rows = await audit(session, node)
            row = next(r for r in rows if r["requestId"] == refused[2])
            assert row["status"] == 401 and (row["appId"], row["peerDeviceId"]) != (CHAT, chat_signer.device_id)
            as_chat = [r["requestId"] for r in rows if (r["appId"], r["peerDeviceId"]) == (CHAT, chat_signer.device_id)]
            assert as_chat == [request_of[(0, CHAT)]]  # the refused claim left no row for chat on device 0
            notes_key = callers[(SIGNERS, NOTES)]
            status, body, rid, _ = await post(session, node, notes_key, chat(), app=CHAT)  # notes' API key claims chat
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

            # -- revoking one app (its pairing, or its key) leaves the device's other apps working --
            unpaired = callers[(1, NOTES)]
            async with session.delete(f"{node.root}/v1/dvai/pairings/{unpaired.device_id}",
                                      params={"appId": NOTES}) as response:
                assert response.status == 200
                assert [p["peerAppId"] for p in (await response.json())["pairings"]] == [NOTES]
            answers = dict(zip(APPS, await asyncio.gather(*(post(session, node, callers[(1, app)], chat())
                                                           for app in APPS)), strict=True))
            assert_refused(answers[NOTES], 401, "app_id_mismatch")
            assert answers[CHAT][0] == answers[MAIL][0] == 200
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
            pairings_before = await app_pairings(session, node)
            assert pairings_before == sorted((c.device_id, c.app) for c in signed if c is not unpaired)
    finally:
        node.stop()

    # -- a restart keeps usage, per-app pairings, revocations and the day's token budget ------
    again = start_node_process(tmp_path / "hub", config_text=config)
    try:
        async with aiohttp.ClientSession() as session:
            assert await usage(session, again) == usage_before
            assert await app_pairings(session, again) == pairings_before
            after = dict(zip(((c.device, c.app) for c in signed),
                             await asyncio.gather(*(post(session, again, c, chat()) for c in signed)), strict=True))
            assert_refused(after.pop((unpaired.device, unpaired.app)), 401, "app_id_mismatch")
            assert [status for status, *_ in after.values()] == [200] * len(after)  # each app's key still signs
            expected = {rid: (app, identities[d].device_id) for (d, app), (_, _, rid, _) in after.items()}
            seen = {r["requestId"]: (r["appId"], r["peerDeviceId"])
                    for r in await audit(session, again) if r["requestId"] in expected}
            assert seen == expected
            assert (await post(session, again, revoked, chat()))[0] == 401
            status, body, _, _ = await post(session, again, mail, chat("metered", 5))
            assert status == 429 and body["error"]["code"] == "insufficient_quota"
    finally:
        again.stop()


async def app_pairings(session: aiohttp.ClientSession, node: NodeProcess) -> list[tuple[str, str]]:
    """(device, app) of every pairing that lets an app on a device call the node."""
    async with session.get(node.root + "/v1/dvai/pairings") as response:
        assert response.status == 200
        return sorted((p["peerDeviceId"], p["peerAppId"]) for p in (await response.json())["data"]
                      if p["peerAppId"] is not None)


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
