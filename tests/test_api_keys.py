"""API keys: minted, shown once, stored hashed, scoped, expirable, revocable — and accepted by
the exposure policy where a signature is. Real node processes (SIMULATED engine: this is about
authentication, not inference) talked to with the openai SDK and aiohttp."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from node.hub.keys import API_KEYS_FILE, ApiKeyStore, KeyScopes, bearer_token

from .conftest import NodeProcess, start_node_process

SIM = """
[models.sim]
engine = "simulated"
simulated_tok_per_s = 500.0
[models.other]
engine = "simulated"
simulated_tok_per_s = 500.0
"""

# A loopback caller counts as a LAN caller here: the node must ask it for a signature or a key.
EXPOSED = SIM + """
[security]
require_pairing = true
trust_loopback = false
"""


def test_the_store_keeps_only_hashes_at_mode_0600(tmp_path: Path) -> None:
    now = [1_000_000]
    store = ApiKeyStore.load(tmp_path, clock=lambda: now[0])
    record, token = store.create("com.acme.chat", name="laptop", expires_in_s=60)
    raw = (tmp_path / API_KEYS_FILE).read_text()
    assert token not in raw and token.split("-")[2] not in raw and record.digest in raw
    assert (tmp_path / API_KEYS_FILE).stat().st_mode & 0o777 == 0o600
    again = ApiKeyStore.load(tmp_path, clock=lambda: now[0])
    assert again.authenticate(token).app_id == "com.acme.chat"
    with pytest.raises(Exception, match="invalid API key"):
        again.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B"))
    now[0] += 61_000  # expired
    with pytest.raises(Exception, match="expired or was revoked"):
        again.authenticate(token)
    assert bearer_token("Bearer  x ") == "x" and bearer_token("Basic x") is None and bearer_token(None) is None


@pytest.fixture
def exposed(tmp_path: Path) -> Iterator[tuple[NodeProcess, str, str]]:
    store = ApiKeyStore.load(tmp_path / "node")
    _, scoped = store.create("com.acme.chat", scopes=KeyScopes(models=("sim",), offload=False))
    _, everything = store.create("com.acme.notes")
    node = start_node_process(tmp_path / "node", config_text=EXPOSED)
    try:
        yield node, scoped, everything
    finally:
        node.stop()


async def test_an_exposed_node_accepts_a_key_where_it_accepts_a_signature(
        exposed: tuple[NodeProcess, str, str]) -> None:
    node, scoped, everything = exposed
    messages = [{"role": "user", "content": "hi"}]
    anonymous = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        await anonymous.chat.completions.create(model="sim", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert refused.value.code == "signature_required"
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key=scoped, max_retries=0)
    reply = await client.chat.completions.create(model="sim", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    stream = await client.chat.completions.create(model="sim", messages=messages, max_tokens=4,  # type: ignore[arg-type]
                                                  stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    with pytest.raises(openai.PermissionDeniedError) as denied:  # outside the key's model scope
        await client.chat.completions.create(model="other", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert denied.value.code == "key_scope_denied"
    wrong = openai.AsyncOpenAI(base_url=node.base_url, api_key=everything[:-2] + "xx", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as bad:
        await wrong.models.list()
    assert bad.value.code == "invalid_api_key"
    other_app = openai.AsyncOpenAI(base_url=node.base_url, api_key=everything, max_retries=0)
    assert (await other_app.chat.completions.create(model="other", messages=messages,  # type: ignore[arg-type]
                                                    max_tokens=4)).choices
    async with aiohttp.ClientSession() as session:  # keys never open the admin endpoints to non-loopback callers
        async with session.get(node.root + "/v1/dvai/keys", headers={"Authorization": f"Bearer {everything}"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "loopback_only"
    node.stop()
    rows = sqlite3.connect(node.state_dir / "audit.sqlite3").execute(
        "SELECT app_id, peer_device_id, status, model_requested FROM audit ORDER BY ts").fetchall()
    scoped_id, everything_id = scoped.split("-")[1], everything.split("-")[1]
    assert ("anonymous", "anonymous", 401, None) in rows
    assert ("com.acme.chat", f"apikey:{scoped_id}", 200, "sim") in rows
    assert ("com.acme.chat", f"apikey:{scoped_id}", 403, "other") in rows
    assert ("com.acme.notes", f"apikey:{everything_id}", 200, "other") in rows
    log = "".join(node.output) + (node.state_dir / API_KEYS_FILE).read_text()
    dump = "\n".join(str(r) for r in sqlite3.connect(node.state_dir / "audit.sqlite3").execute("SELECT * FROM audit"))
    for key in (scoped, everything):
        assert key not in log and key not in dump  # never printed, never stored


async def test_keys_are_minted_listed_and_revoked_at_once_through_the_admin_api(tmp_path: Path) -> None:
    node = start_node_process(tmp_path / "node", config_text=SIM)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(node.root + "/v1/dvai/keys", json={
                    "appId": "com.acme.chat", "name": "ci", "scopes": {"models": ["sim"]}}) as response:
                assert response.status == 201
                minted = await response.json()
            key = minted["key"]
            assert key.startswith("dvai-") and minted["appId"] == "com.acme.chat"
            async with session.get(node.root + "/v1/dvai/keys") as response:
                listed = (await response.json())["data"]
            assert [k["id"] for k in listed] == [minted["id"]] and key not in json.dumps(listed)
            client = openai.AsyncOpenAI(base_url=node.base_url, api_key=key, max_retries=0)
            messages = [{"role": "user", "content": "hi"}]
            assert (await client.chat.completions.create(model="sim", messages=messages,  # type: ignore[arg-type]
                                                         max_tokens=2)).choices
            async with session.delete(node.root + f"/v1/dvai/keys/{minted['id']}") as response:
                assert response.status == 200 and (await response.json())["revokedAt"]
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(model="sim", messages=messages, max_tokens=2)  # type: ignore[arg-type]
            for bad in ({"appId": ""}, {"appId": "ok", "scopes": {"models": []}}, {"appId": "ok", "expiresIn": -1},
                        {"appId": "ok", "scopes": {"offload": "yes"}}, []):
                async with session.post(node.root + "/v1/dvai/keys", json=bad) as response:
                    assert response.status == 400 and (await response.json())["error"]["type"] == "invalid_request_error"
            async with session.delete(node.root + "/v1/dvai/keys/nope") as response:
                assert response.status == 404
    finally:
        node.stop()
