"""Per-app quotas (pure, with a fake clock) and usage accounting through real node processes
(SIMULATED engine: about admission and counting, not generation)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from node.common.errors import RateLimitedError
from node.config import QuotaConfig
from node.hub.keys import ApiKeyStore
from node.hub.quotas import QuotaBook, QuotaSubject, seconds_until_utc_midnight

from .conftest import start_node_process

CHAT_APP = QuotaSubject("com.acme.chat", "dv-laptop", "sim")
NOTES_APP = QuotaSubject("com.acme.notes", "dv-laptop", "sim")


def book(*rules: QuotaConfig, used: int = 0, now: list[float] | None = None) -> QuotaBook:
    clock = now or [1_000_000.0]
    return QuotaBook(rules, usage=lambda subject, per_device, per_model: used, clock=lambda: clock[0])


def test_requests_per_minute_hit_exactly_at_the_limit_and_free_up_as_the_window_slides() -> None:
    now = [1_000_000.0]
    quotas = book(QuotaConfig(app_id="com.acme.chat", requests_per_minute=3), now=now)
    for _ in range(3):
        quotas.admit(CHAT_APP).release()
    with pytest.raises(RateLimitedError) as over:
        quotas.admit(CHAT_APP)
    assert over.value.status == 429 and over.value.code == "rate_limit_exceeded"
    assert over.value.headers["Retry-After"] == "60"
    quotas.admit(NOTES_APP)  # another app is not limited by this rule
    now[0] += 60.0
    quotas.admit(CHAT_APP)


def test_concurrency_is_held_until_released_and_per_device_rules_count_each_device() -> None:
    quotas = book(QuotaConfig(app_id="*", device_id="*", concurrent=1))
    lease = quotas.admit(CHAT_APP)
    with pytest.raises(RateLimitedError):
        quotas.admit(CHAT_APP)
    quotas.admit(QuotaSubject("com.acme.chat", "dv-phone", "sim"))  # another device: its own slot
    lease.release()
    lease.release()  # a second release changes nothing
    quotas.admit(CHAT_APP)


def test_the_daily_token_budget_answers_insufficient_quota_until_midnight_utc() -> None:
    now = [86400.0 * 20_000 + 3600.0]
    quotas = book(QuotaConfig(app_id="com.acme.chat", tokens_per_day=100), used=100, now=now)
    with pytest.raises(RateLimitedError) as over:
        quotas.admit(CHAT_APP)
    assert over.value.code == "insufficient_quota" and over.value.headers["Retry-After"] == str(23 * 3600)
    assert seconds_until_utc_midnight(now[0]) == 23 * 3600
    assert book(QuotaConfig(app_id="com.acme.chat", tokens_per_day=100), used=99).admit(CHAT_APP)


SIM = """
[models.sim]
engine = "simulated"
simulated_tok_per_s = 1000.0

[[hub.quotas]]
app_id = "com.acme.chat"
requests_per_minute = 4
tokens_per_day = 100000

[[hub.quotas]]
app_id = "com.acme.notes"
tokens_per_day = 30
"""


async def test_quotas_and_usage_through_a_node_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "node"
    keys = ApiKeyStore.load(state)
    _, chat_key = keys.create("com.acme.chat")
    _, notes_key = keys.create("com.acme.notes")
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

    async def call(session: aiohttp.ClientSession, base: str, key: str) -> aiohttp.ClientResponse:
        async with session.post(base + "/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as response:
            await response.read()
            return response

    node = start_node_process(state, config_text=SIM)
    try:
        async with aiohttp.ClientSession() as session:
            statuses = [(await call(session, node.base_url, chat_key)).status for _ in range(5)]
            assert statuses == [200, 200, 200, 200, 429]
            limited = await call(session, node.base_url, chat_key)
            assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
            # notes: 30 tokens a day; each answer costs prompt + 8 completion tokens
            notes = []
            for _ in range(6):
                notes.append((await call(session, node.base_url, notes_key)).status)
            assert notes[0] == 200 and notes[-1] == 429 and 429 in notes
            await asyncio.sleep(0.2)
            async with session.get(node.root + "/v1/dvai/usage?days=1") as response:
                rows = (await response.json())["data"]
        by_app = {row["appId"]: row for row in rows}
        assert by_app["com.acme.chat"]["requests"] == 4
        notes_served = notes.count(200)
        assert by_app["com.acme.notes"]["requests"] == notes_served
        assert by_app["com.acme.notes"]["promptTokens"] + by_app["com.acme.notes"]["completionTokens"] >= 30
    finally:
        node.stop()
    again = start_node_process(state, config_text=SIM)  # the day's budget survives a restart
    try:
        async with aiohttp.ClientSession() as session:
            assert (await call(session, again.base_url, notes_key)).status == 429
            assert (await call(session, again.base_url, chat_key)).status == 200  # the minute window is in memory
            async with session.get(again.root + "/v1/dvai/usage?days=1&app=com.acme.notes") as response:
                assert [r["requests"] for r in (await response.json())["data"]] == [notes_served]
            async with session.get(again.root + "/v1/dvai/usage?days=0") as response:
                assert response.status == 400
    finally:
        again.stop()
