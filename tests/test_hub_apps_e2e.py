"""Per-app pairing through real node processes (issue 13), on the SIMULATED engine: this is about
who may call and with which key, not inference.

Two apps on one device pair separately (one approved by its app rule, one by the operator
through the CLI), each signs with its own key; one app's key cannot act as the other; revoking
one app leaves the other working; pairings survive a restart; a version 2 ``pairings.json`` is
migrated when the node starts; the hub admin commands list what they should."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.identity import DeviceIdentity
from node.pairing.handshake import make_handshake_proof
from node.pairing.store import PAIRINGS_FILE, decode_key
from node.security.signing import sign_request_headers

from .conftest import REPO, NodeProcess, start_node_process

SIMULATED = '[models.sim]\nengine = "simulated"\nsimulated_tok_per_s = 500.0\n'  # SIMULATED engine
HUB = SIMULATED + """
[[security.app_pairing]]
app_id = "com.acme.chat"
policy = "allow"

[[security.app_pairing]]
app_id = "com.acme.notes"
policy = "prompt"

[[security.app_pairing]]
app_id = "com.evil.spy"
policy = "deny"
"""
CHAT, NOTES, AGENT = "com.acme.chat", "com.acme.notes", "com.acme.agent"
CHAT_BODY = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
    return subprocess.run([sys.executable, "-m", "node", *args, "--state-dir", str(node.state_dir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def cli_json(node: NodeProcess, *args: str) -> Any:
    done = cli(node, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def handshake(session: aiohttp.ClientSession, root: str, device: DeviceIdentity, app: str,
                    at_ms: int) -> tuple[int, dict[str, Any]]:
    """The LAN handshake for ``app`` on ``device``, with a device id proof (``root``: the node's URL)."""
    async with session.get(root + "/v1/dvai/health") as health:
        node_id = (await health.json())["deviceId"]
    body = {"peerDeviceId": device.device_id, "peerDeviceName": "Test phone", "appId": app,
            "via": "lan-handshake", **make_handshake_proof(device, node_id, at_ms)}
    async with session.post(root + "/v1/dvai/handshake", json=body) as response:
        return response.status, await response.json()


async def chat(session: aiohttp.ClientSession, base_url: str, key: bytes, device: str,
               app: str) -> tuple[int, dict[str, Any]]:
    """A chat completion signed with ``key`` as ``app`` on ``device`` (``base_url``: …/v1)."""
    headers = {**sign_request_headers(key, device, app, "POST", "/v1/chat/completions", CHAT_BODY),
               "Content-Type": "application/json"}
    async with session.post(base_url + "/chat/completions", data=CHAT_BODY, headers=headers) as response:
        return response.status, await response.json()


def assert_refused(answer: tuple[int, dict[str, Any]], status: int, code: str) -> None:
    """An OpenAI-shaped error with this status and code."""
    got, body = answer
    assert got == status, body
    error = body["error"]
    assert error["code"] == code and error["type"] and error["message"], body


async def test_two_apps_on_one_device_pair_sign_and_revoke_separately(tmp_path: Path) -> None:
    phone = DeviceIdentity.from_private_key(Ed25519PrivateKey.generate())
    now_ms = time.time_ns() // 1_000_000
    node = start_node_process(tmp_path / "hub", config_text=HUB, args=["--hub"])
    try:
        assert any(line.startswith("hub mode: pairing per app") for line in node.output)
        async with aiohttp.ClientSession() as session:
            # com.acme.chat: its app rule approves a device that proves its id, at once
            status, chat_answer = await handshake(session, node.root, phone, CHAT, now_ms)
            assert status == 200 and chat_answer["appId"] == CHAT
            chat_key = decode_key(chat_answer["pairingKey"])
            # com.acme.notes on the same device: its own request, which the operator approves
            notes_task = asyncio.create_task(handshake(session, node.root, phone, NOTES, now_ms + 1))
            for _ in range(200):
                pending = cli_json(node, "pairing", "pending")
                if pending:
                    break
                await asyncio.sleep(0.05)
            assert [(r["peerDeviceId"], r["appId"], r["proven"]) for r in pending] == [(phone.device_id, NOTES, True)]
            approved = cli(node, "pairing", "approve", phone.device_id, "--app", NOTES)
            assert approved.returncode == 0 and NOTES in approved.stdout, approved.stderr
            status, notes_answer = await notes_task
            assert status == 200 and notes_answer["appId"] == NOTES
            notes_key = decode_key(notes_answer["pairingKey"])
            assert notes_key != chat_key
            assert_refused(await handshake(session, node.root, phone, "com.evil.spy", now_ms + 2), 403,
                           "app_pairing_denied")

            # each app signs with its own key
            assert (await chat(session, node.base_url, chat_key, phone.device_id, CHAT))[0] == 200
            assert (await chat(session, node.base_url, notes_key, phone.device_id, NOTES))[0] == 200
            # one app's key never acts for another
            assert_refused(await chat(session, node.base_url, chat_key, phone.device_id, NOTES), 401, "bad_signature")
            assert_refused(await chat(session, node.base_url, notes_key, phone.device_id, CHAT), 401, "bad_signature")
            assert_refused(await chat(session, node.base_url, chat_key, phone.device_id, "com.acme.other"), 401,
                           "app_id_mismatch")

            devices = {d["deviceId"]: d for d in cli_json(node, "devices")}
            assert [a["appId"] for a in devices[phone.device_id]["apps"]] == [CHAT, NOTES]
            apps = {a["appId"]: a for a in cli_json(node, "apps")}
            assert apps[CHAT]["pairedDevices"] == [phone.device_id] == apps[NOTES]["pairedDevices"]
            quotas = cli_json(node, "quotas")
            assert quotas["hubMode"] is True and {q["requestsPerMinute"] for q in quotas["data"]} >= {120}

            # a third app without signing: an API key minted, listed, used and revoked through the CLI
            minted = cli_json(node, "keys", "create", "--app", AGENT, "--name", "ci", "--models", "sim")
            agent = openai.AsyncOpenAI(base_url=node.base_url, api_key=minted["key"], max_retries=0)
            reply = await agent.chat.completions.create(model="sim", max_tokens=4,
                                                        messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
            listed = cli(node, "keys", "list")
            assert listed.returncode == 0 and minted["id"] in listed.stdout and "active" in listed.stdout
            assert minted["key"] not in listed.stdout
            apps = {a["appId"]: a for a in cli_json(node, "apps")}
            assert apps[AGENT]["activeKeys"] == [minted["id"]] and apps[AGENT]["usage"]["requests"] == 1
            usage = {(r["appId"], r["deviceId"]) for r in cli_json(node, "usage")}
            assert {(CHAT, phone.device_id), (NOTES, phone.device_id), (AGENT, f"apikey:{minted['id']}")} <= usage
            assert cli(node, "keys", "revoke", minted["id"]).returncode == 0
            with pytest.raises(openai.AuthenticationError) as revoked_key:
                await agent.models.list()
            assert revoked_key.value.code == "invalid_api_key"

            # revoking one app leaves the device's other app working
            revoked = cli(node, "pairing", "revoke", phone.device_id, "--app", NOTES)
            assert revoked.returncode == 0, revoked.stderr
            assert_refused(await chat(session, node.base_url, notes_key, phone.device_id, NOTES), 401, "app_id_mismatch")
            assert (await chat(session, node.base_url, chat_key, phone.device_id, CHAT))[0] == 200
            pairing_url = f"{node.root}/v1/dvai/pairings/{phone.device_id}"
            async with session.delete(pairing_url + "?appId=") as empty:  # never "every app" by accident
                assert_refused((empty.status, await empty.json()), 400, "invalid_request")
            async with session.delete(pairing_url, params={"appId": NOTES}) as again:
                assert_refused((again.status, await again.json()), 404, "not_found")
        node.stop()

        stored = json.loads((node.state_dir / PAIRINGS_FILE).read_text())
        assert stored["version"] == 3 and stat.S_IMODE(os.stat(node.state_dir / PAIRINGS_FILE).st_mode) == 0o600
        rows = sqlite3.connect(node.state_dir / "audit.sqlite3").execute(
            "SELECT app_id, peer_device_id, status FROM audit WHERE endpoint LIKE '%chat/completions'").fetchall()
        assert rows.count((CHAT, phone.device_id, 200)) == 2 and rows.count((NOTES, phone.device_id, 200)) == 1
        assert not [r for r in rows if r[1] == phone.device_id and r[2] >= 400]  # refusals are not attributed

        # the pairing survives a restart; the revoked app stays revoked
        node = start_node_process(tmp_path / "hub", config_text=HUB, args=["--hub"])
        async with aiohttp.ClientSession() as session:
            assert (await chat(session, node.base_url, chat_key, phone.device_id, CHAT))[0] == 200
            assert_refused(await chat(session, node.base_url, notes_key, phone.device_id, NOTES), 401, "app_id_mismatch")
            everything = cli(node, "pairing", "revoke", phone.device_id)  # no app: every pairing with it
            assert everything.returncode == 0, everything.stderr
            assert_refused(await chat(session, node.base_url, chat_key, phone.device_id, CHAT), 401, "unknown_pairing")
        assert cli_json(node, "pairing", "list") == []
    finally:
        node.stop()


async def test_a_version_2_pairing_store_is_migrated_when_the_node_starts(tmp_path: Path) -> None:
    state = tmp_path / "node"
    state.mkdir()
    fixture = Path(__file__).parent / "fixtures" / "pairings-v2.json"
    (state / PAIRINGS_FILE).write_bytes(fixture.read_bytes())
    os.chmod(state / PAIRINGS_FILE, 0o600)
    node = start_node_process(state, config_text=SIMULATED)
    try:
        stored = json.loads((state / PAIRINGS_FILE).read_text())
        assert stored["version"] == 3 and stat.S_IMODE(os.stat(state / PAIRINGS_FILE).st_mode) == 0o600
        listed = cli_json(node, "pairing", "list")
        assert sorted((p["peerDeviceId"], p["role"]) for p in listed) == sorted(
            (p["peerDeviceId"], p["role"]) for p in json.loads(fixture.read_text())["pairings"])
        laptop = "dvlaptopaaaaaaaaaaaaaaaaaaaaaaaaaa"
        async with aiohttp.ClientSession() as session:
            assert (await chat(session, node.base_url, b"L" * 32, laptop, CHAT))[0] == 200  # the v2 inbound key still works
            assert_refused(await chat(session, node.base_url, b"O" * 32, laptop, CHAT), 401, "bad_signature")  # outbound key
        devices = {d["deviceId"]: d for d in cli_json(node, "devices")}
        assert [a["appId"] for a in devices[laptop]["apps"]] == [CHAT] and devices[laptop]["outbound"] is True
    finally:
        node.stop()


async def test_the_library_hook_hands_out_a_host_managed_key_per_app(tmp_path: Path) -> None:
    """An embedding host keeps its own multi-tenant pairing state (the reference's Hub
    MultiTenantPairing): its ``on_pairing_request`` returns ``{approved, pairingKey}`` per (device,
    app), and the node verifies each app against that app's key. In-process node, HTTP on
    loopback, SIMULATED engine; the interceptor reports who the node authenticated."""
    from node import Node, load_config
    from node.hub.interceptor import InterceptContext
    from node.pairing import PairingRequest
    from node.pairing.store import encode_key

    host_keys: dict[tuple[str, str], bytes] = {}

    def hook(request: PairingRequest) -> dict[str, object]:
        key = host_keys.setdefault((request.peer_device_id, request.app_id), os.urandom(32))
        return {"approved": True, "pairingKey": encode_key(key)}

    seen: list[tuple[str, str]] = []

    def interceptor(body: Any, context: InterceptContext, headers: Any) -> None:
        seen.append((context.peer_device_id, context.app_id))

    config = load_config(env={}, overrides={
        "state_dir": str(tmp_path), "http_base_port": 0,
        "models": {"sim": {"engine": "simulated", "simulated_tok_per_s": 500.0}}})
    phone = DeviceIdentity.from_private_key(Ed25519PrivateKey.generate())
    now_ms = time.time_ns() // 1_000_000
    async with Node(config, on_pairing_request=hook, chat_completion_interceptor=interceptor) as embedded:
        assert embedded.base_url is not None
        base_url = embedded.base_url
        root = base_url.removesuffix("/v1")
        async with aiohttp.ClientSession() as session:
            for offset, app in enumerate((CHAT, NOTES)):
                status, answer = await handshake(session, root, phone, app, now_ms + offset)
                assert status == 200 and decode_key(answer["pairingKey"]) == host_keys[(phone.device_id, app)]
            chat_key, notes_key = host_keys[(phone.device_id, CHAT)], host_keys[(phone.device_id, NOTES)]
            assert (await chat(session, base_url, chat_key, phone.device_id, CHAT))[0] == 200
            assert (await chat(session, base_url, notes_key, phone.device_id, NOTES))[0] == 200
            assert_refused(await chat(session, base_url, chat_key, phone.device_id, NOTES), 401, "bad_signature")
    assert seen == [(phone.device_id, CHAT), (phone.device_id, NOTES)]


def test_a_hub_refuses_to_let_unsigned_network_callers_in(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
    for unsafe in ({"DVAI_SECURITY__ALLOW_ANONYMOUS_LAN": "true"}, {"DVAI_SECURITY__REQUIRE_PAIRING": "false"}):
        done = subprocess.run([sys.executable, "-m", "node", "serve", "--hub", "--state-dir", str(tmp_path)],
                              cwd=REPO, env={**env, **unsafe}, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and "configuration error: hub.enabled" in done.stderr, done.stderr
