"""Per-app pairing (issue 13): each app on a device has its own key, approval and revocation.

Plain data and in-process handshakes; tests/test_hub_apps_e2e.py runs the same through real
node processes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.common.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    DVAIError,
    NotFoundError,
    PermissionDeniedError,
)
from node.config import AppPairingRule, SecurityConfig, load_config
from node.hub.directory import apps_json, devices_json, quota_rules_json
from node.hub.keys import ApiKey
from node.identity import DeviceIdentity
from node.pairing.approval import PairingApprover, PairingRequest
from node.pairing.handshake import handle_handshake, make_handshake_proof, pair_with
from node.pairing.store import PAIRINGS_FILE, STORE_FORMAT_VERSION, Pairing, PairingStore, encode_key
from node.security.signing import NonceCache, sign_request_headers, sign_with_pairing, verify_signed_request

NOW = 1_778_184_673_778
NODE_ID = "dvthisnodeaaaaaaaaaaaaaaaaaaaaaaaa"
ME = "dv-this-node"
PHONE = DeviceIdentity.from_private_key(Ed25519PrivateKey.from_private_bytes(b"\x03" * 32))
CHAT, NOTES = "com.acme.chat", "com.acme.notes"


def inbound(app: str, key: bytes, device: str = PHONE.device_id) -> Pairing:
    return Pairing(peer_device_id=device, peer_device_name="Phone", key=key, via="lan-handshake",
                   paired_at=NOW, role="inbound", peer_app_id=app)


_proof_stamps = iter(range(NOW - 100_000, NOW + 100_000, 7))


def body(app: str | None, *, proof: bool = True) -> dict[str, Any]:
    """A handshake from PHONE for ``app``; each proof at its own timestamp (a proof is single-use)."""
    out: dict[str, Any] = {"peerDeviceId": PHONE.device_id, "peerDeviceName": "Phone", "via": "lan-handshake"}
    if app is not None:
        out["appId"] = app
    if proof:
        out.update(make_handshake_proof(PHONE, NODE_ID, next(_proof_stamps)))
    return out


async def handshake(approver: PairingApprover, store: PairingStore, payload: dict[str, Any]) -> dict[str, Any]:
    return await handle_handshake(payload, remote="192.168.1.30", approver=approver, store=store,
                                  node_device_id=NODE_ID, now=lambda: NOW)


def verify(store: PairingStore, key: bytes, app: str, device: str = PHONE.device_id) -> Any:
    headers = sign_request_headers(key, device, app, "POST", "/v1/chat/completions", b"{}", now_ms=NOW)
    return verify_signed_request(headers, "POST", "/v1/chat/completions", b"{}", lookup_key=store.credential_for,
                                 nonces=NonceCache(), now_ms=NOW, device_known=store.knows_device)


def auth_code(store: PairingStore, key: bytes, app: str) -> str:
    with pytest.raises(AuthenticationError) as caught:
        verify(store, key, app)
    assert caught.value.status == 401 and caught.value.to_body()["error"]["type"]
    return str(caught.value.code)


@pytest.fixture
def store(tmp_path: Path) -> PairingStore:
    return PairingStore(tmp_path / PAIRINGS_FILE)


# --------------------------------------------------------------------------
# The store: one inbound pairing per (device, app)


async def test_two_apps_on_one_device_hold_their_own_keys(store: PairingStore) -> None:
    await store.add(inbound(CHAT, b"a" * 32))
    await store.add(inbound(NOTES, b"b" * 32))
    assert [p.peer_app_id for p in store.apps_of(PHONE.device_id)] == [CHAT, NOTES]
    assert store.credential_for(PHONE.device_id, CHAT).key == b"a" * 32  # type: ignore[union-attr]
    assert store.get(PHONE.device_id, app_id=NOTES).key == b"b" * 32  # type: ignore[union-attr]
    assert store.get(PHONE.device_id) is None  # two apps, none named like the device: ambiguous
    assert verify(store, b"a" * 32, CHAT).app_id == CHAT
    assert verify(store, b"b" * 32, NOTES).app_id == NOTES
    # one app's key never acts for another: app A's key claiming app B fails B's key
    assert auth_code(store, b"a" * 32, NOTES) == "bad_signature"
    assert auth_code(store, b"a" * 32, "com.acme.unpaired") == "app_id_mismatch"
    await store.add(inbound(CHAT, b"c" * 32))  # a new handshake for one app replaces only its key
    assert auth_code(store, b"a" * 32, CHAT) == "bad_signature"
    assert verify(store, b"b" * 32, NOTES).signed and len(store) == 2


async def test_revoking_one_app_leaves_the_others_and_revoking_the_device_revokes_all(
        store: PairingStore, tmp_path: Path) -> None:
    await store.add(inbound(CHAT, b"a" * 32))
    await store.add(inbound(NOTES, b"b" * 32))
    await store.add(Pairing(peer_device_id=PHONE.device_id, peer_device_name="Phone", key=b"o" * 32,
                            via="lan-handshake", paired_at=NOW, role="outbound", our_app_id=ME))
    removed = await store.revoke(PHONE.device_id, NOTES)
    assert [p.peer_app_id for p in removed] == [NOTES]
    assert auth_code(store, b"b" * 32, NOTES) == "app_id_mismatch"
    assert verify(store, b"a" * 32, CHAT).signed
    reloaded = PairingStore.load_sync(tmp_path, self_device_id=ME)
    assert [p.peer_app_id for p in reloaded.apps_of(PHONE.device_id)] == [CHAT]
    with pytest.raises(NotFoundError):
        await store.revoke(PHONE.device_id, NOTES)
    assert len(await store.revoke(PHONE.device_id)) == 2  # the other app and the outbound pairing
    assert store.list() == [] and auth_code(store, b"a" * 32, CHAT) == "unknown_pairing"


async def test_revoking_the_app_of_a_mutual_pairing_keeps_its_outbound_half(store: PairingStore) -> None:
    peer = "dvpeer"
    await store.add(Pairing(peer_device_id=peer, peer_device_name="P", key=b"m" * 32, via="rendezvous",
                            paired_at=NOW, role="mutual", our_app_id=ME, peer_app_id=peer))
    assert store.get(peer) is store.get(peer, direction="outbound")  # the QR pairing's app is the device id
    await store.add(inbound(CHAT, b"a" * 32, device=peer))  # another app of that device pairs over the LAN
    assert store.get(peer, app_id=peer).role == "mutual"  # type: ignore[union-attr]
    await store.revoke(peer, peer)
    outbound = store.get(peer, direction="outbound")
    assert outbound is not None and outbound.role == "outbound" and outbound.peer_app_id is None
    assert sign_with_pairing(outbound, ME, "GET", "/v1/models", b"")["X-DVAI-App-Id"] == ME
    assert store.credential_for(peer, peer) is None and store.credential_for(peer, CHAT) is not None


def test_a_version_2_file_is_migrated_to_version_3(tmp_path: Path) -> None:
    """A v2 store held one inbound pairing per device (under whatever app id it bound): the
    same records load, each inbound one under its app, and the file is rewritten as v3."""
    fixture = Path(__file__).parent / "fixtures" / "pairings-v2.json"
    (tmp_path / PAIRINGS_FILE).write_bytes(fixture.read_bytes())
    os.chmod(tmp_path / PAIRINGS_FILE, 0o644)
    store = PairingStore.load_sync(tmp_path, self_device_id=ME)
    rewritten = json.loads((tmp_path / PAIRINGS_FILE).read_text())
    assert rewritten["version"] == STORE_FORMAT_VERSION == 3
    assert stat.S_IMODE(os.stat(tmp_path / PAIRINGS_FILE).st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != PAIRINGS_FILE]  # atomic: no temp file left
    original = json.loads(fixture.read_text())["pairings"]
    def canonical(records: list[Any]) -> list[str]:
        return sorted(json.dumps(r, sort_keys=True) for r in records)

    assert canonical(rewritten["pairings"]) == canonical(original)
    chat = store.credential_for("dvlaptopaaaaaaaaaaaaaaaaaaaaaaaaaa", "com.acme.chat")
    assert chat is not None and chat.role == "inbound"
    assert store.credential_for("dvqrpeeraaaaaaaaaaaaaaaaaaaaaaaaaa", "dvqrpeeraaaaaaaaaaaaaaaaaaaaaaaaaa") is \
        store.get("dvqrpeeraaaaaaaaaaaaaaaaaaaaaaaaaa", direction="outbound")
    assert store.get("dvlaptopaaaaaaaaaaaaaaaaaaaaaaaaaa", direction="outbound") is not None
    assert PairingStore.load_sync(tmp_path, self_device_id=ME).list() == store.list()  # v3 reads back as is


def test_a_newer_store_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / PAIRINGS_FILE).write_text(json.dumps({"version": 4, "pairings": []}))
    with pytest.raises(ValueError, match="unsupported version 4"):
        PairingStore.load_sync(tmp_path, self_device_id=ME)


# --------------------------------------------------------------------------
# Handshakes and approval per app


async def test_each_app_is_approved_on_its_own_with_its_own_key(store: PairingStore) -> None:
    approver = PairingApprover(policy="prompt")
    chat = asyncio.create_task(handshake(approver, store, body(CHAT)))
    await asyncio.sleep(0.01)
    notes = asyncio.create_task(handshake(approver, store, {**body(NOTES, proof=False)}))
    for _ in range(100):
        if len(approver.pending()) == 2:
            break
        await asyncio.sleep(0.005)
    assert sorted(r.app_id for r in approver.pending()) == [CHAT, NOTES]
    with pytest.raises(ConflictError) as several:
        approver.approve(PHONE.device_id)  # which app? both wait
    assert several.value.status == 409 and several.value.code == "app_id_required"
    assert approver.approve(PHONE.device_id, CHAT).app_id == CHAT
    approver.deny(PHONE.device_id, NOTES)
    answer = await chat
    assert answer["appId"] == CHAT and answer["peerDeviceId"] == PHONE.device_id
    with pytest.raises(PermissionDeniedError) as denied:
        await notes
    assert denied.value.code == "denied_by_operator"
    assert [p.peer_app_id for p in store.apps_of(PHONE.device_id)] == [CHAT]
    with pytest.raises(NotFoundError):
        approver.approve(PHONE.device_id, NOTES)


async def test_without_app_id_the_device_id_is_the_app(store: PairingStore) -> None:
    approver = PairingApprover(app_rules=[AppPairingRule(app_id=PHONE.device_id, policy="allow")])
    answer = await handshake(approver, store, body(None))
    assert answer["appId"] == PHONE.device_id
    key = bytes.fromhex(verify_key_hex(answer))
    assert verify(store, key, PHONE.device_id).app_id == PHONE.device_id
    assert store.get(PHONE.device_id) is not None  # the reference's fallback: found without naming the app


def verify_key_hex(answer: dict[str, Any]) -> str:
    from node.pairing.store import decode_key

    return decode_key(answer["pairingKey"]).hex()


@pytest.mark.parametrize("rules,app,proof,outcome", [
    ([AppPairingRule(CHAT, "allow")], CHAT, True, "approved"),
    ([AppPairingRule(CHAT, "allow")], CHAT, False, "device_proof_required"),
    ([AppPairingRule(CHAT, "allow", require_proof=False)], CHAT, False, "approved"),
    ([AppPairingRule(CHAT, "deny")], CHAT, True, "app_pairing_denied"),
    ([AppPairingRule(CHAT, "allow")], NOTES, True, "pairing_denied"),  # unlisted: the device policy (deny)
    ([AppPairingRule(CHAT, "allow"), AppPairingRule("*", "deny")], NOTES, True, "app_pairing_denied"),
    ([AppPairingRule("*", "allow"), AppPairingRule(NOTES, "deny")], CHAT, True, "approved"),
    ([AppPairingRule("*", "allow"), AppPairingRule(NOTES, "deny")], NOTES, True, "app_pairing_denied"),
])
async def test_app_rules(store: PairingStore, rules: list[AppPairingRule], app: str, proof: bool,
                         outcome: str) -> None:
    approver = PairingApprover(policy="deny", app_rules=rules)
    if outcome == "approved":
        assert (await handshake(approver, store, body(app, proof=proof)))["appId"] == app
        assert store.credential_for(PHONE.device_id, app) is not None
        return
    with pytest.raises(PermissionDeniedError) as caught:
        await handshake(approver, store, body(app, proof=proof))
    assert caught.value.status == 403 and caught.value.code == outcome
    assert store.list() == []


async def test_a_prompt_rule_asks_the_operator_whatever_the_device_policy(store: PairingStore) -> None:
    approver = PairingApprover(policy="deny", app_rules=[AppPairingRule(NOTES, "prompt")])
    task = asyncio.create_task(handshake(approver, store, body(NOTES)))
    for _ in range(100):
        if approver.pending():
            break
        await asyncio.sleep(0.005)
    assert approver.approve(PHONE.device_id).app_id == NOTES  # the only one waiting: no app needed
    assert (await task)["appId"] == NOTES


async def test_the_hook_manages_one_key_per_app(store: PairingStore) -> None:
    """The reference's MultiTenantPairing: the host keeps a key per (device, app) and hands it back."""
    host_keys = {CHAT: b"C" * 32, NOTES: b"N" * 32}
    seen: list[PairingRequest] = []

    async def hook(request: PairingRequest) -> dict[str, object]:
        seen.append(request)
        return {"approved": True, "pairingKey": encode_key(host_keys[request.app_id])}

    approver = PairingApprover(hook=hook)
    for app, key in host_keys.items():
        answer = await handshake(approver, store, body(app))
        assert answer["pairingKey"] == encode_key(key) and answer["appId"] == app
    assert [(r.peer_device_id, r.app_id) for r in seen] == [(PHONE.device_id, CHAT), (PHONE.device_id, NOTES)]
    assert verify(store, b"C" * 32, CHAT).app_id == CHAT and verify(store, b"N" * 32, NOTES).app_id == NOTES
    assert auth_code(store, b"C" * 32, NOTES) == "bad_signature"


async def test_the_client_pairs_several_apps_of_one_device_at_once(aiohttp_server: Any, tmp_path: Path) -> None:
    """``pair_with`` for three apps of one device in the same millisecond: a proof does not cover
    ``appId`` and a node accepts each proof once, so each handshake needs its own timestamp."""
    approver = PairingApprover(policy="allowlist", allowlist=[PHONE.device_id], rate_per_minute=600)
    node_store = PairingStore(tmp_path / "node" / PAIRINGS_FILE)
    app = web.Application()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "deviceId": NODE_ID, "deviceName": "Hub"})

    async def handshake_handler(request: web.Request) -> web.Response:
        try:
            answer = await handle_handshake(await request.json(), remote="192.168.1.30", approver=approver,
                                            store=node_store, node_device_id=NODE_ID)
        except DVAIError as exc:
            return web.json_response(exc.to_body(), status=exc.status, headers=exc.headers)
        return web.json_response(answer)

    app.router.add_get("/v1/dvai/health", health)
    app.router.add_post("/v1/dvai/handshake", handshake_handler)
    server = await aiohttp_server(app)
    phone_store = PairingStore(tmp_path / "phone" / PAIRINGS_FILE)
    now_ms = time.time_ns() // 1_000_000
    apps = (CHAT, NOTES, "com.acme.mail")
    async with aiohttp.ClientSession() as session:
        pairings = await asyncio.gather(*(
            pair_with(session, str(server.make_url("")), identity=PHONE, my_device_name="Phone", app_id=app_id,
                      store=phone_store, now=lambda: now_ms) for app_id in apps))
    assert [p.our_app_id for p in pairings] == list(apps) and len({p.key for p in pairings}) == 3
    assert [node_store.credential_for(PHONE.device_id, a).key for a in apps] == [p.key for p in pairings]  # type: ignore[union-attr]


# --------------------------------------------------------------------------
# Configuration: app rules and hub mode


def test_app_rules_load_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[[security.app_pairing]]\napp_id = "com.acme.chat"\npolicy = "allow"\n'
                    '[[security.app_pairing]]\napp_id = "*"\npolicy = "prompt"\nrequire_proof = false\n')
    config = load_config(path, env={})
    assert config.security.app_pairing == (AppPairingRule(CHAT, "allow"), AppPairingRule("*", "prompt", False))
    assert PairingApprover.from_config(config.security).rule_for("x") == AppPairingRule("*", "prompt", False)
    path.write_text('[[security.app_pairing]]\napp_id = "a"\npolicy = "allow"\n'
                    '[[security.app_pairing]]\napp_id = "a"\npolicy = "deny"\n')
    with pytest.raises(ConfigError, match="app_pairing"):
        load_config(path, env={})
    path.write_text('[[security.app_pairing]]\napp_id = "a"\npolicy = "maybe"\n')
    with pytest.raises(ConfigError, match="policy"):
        load_config(path, env={})


def test_hub_mode_fills_in_safe_defaults_under_the_operators_keys(tmp_path: Path) -> None:
    plain = load_config(None, env={})
    assert not plain.hub.enabled and plain.hub.quotas == () and plain.security.pairing_policy == "deny"
    hub = load_config(None, env={}, overrides={"hub": {"enabled": True}})
    assert hub.hub.enabled and hub.security.pairing_policy == "prompt" and hub.audit.enabled
    assert hub.http_bind_host == "127.0.0.1"  # the bind address stays the operator's
    rules = quota_rules_json(hub.hub.quotas)
    assert {"appId": "*", "deviceId": "*", "model": None, "requestsPerMinute": 120, "tokensPerDay": None,
            "concurrent": 4} in rules and any(r["tokensPerDay"] == 2_000_000 for r in rules)
    path = tmp_path / "node.toml"
    path.write_text('[hub]\nenabled = true\nquotas = []\n[security]\npairing_policy = "allowlist"\n')
    explicit = load_config(path, env={})
    assert explicit.hub.quotas == () and explicit.security.pairing_policy == "allowlist"
    assert load_config(None, env={"DVAI_HUB__ENABLED": "true"}).security.pairing_policy == "prompt"
    for unsafe in ({"allow_anonymous_lan": True}, {"require_pairing": False}):
        with pytest.raises(ConfigError, match="hub"):
            load_config(None, env={}, overrides={"hub": {"enabled": True}, "security": unsafe})


def test_the_security_defaults_have_no_app_rules() -> None:
    assert SecurityConfig().app_pairing == ()


# --------------------------------------------------------------------------
# The directory: apps and devices


def test_apps_and_devices_come_from_pairings_keys_and_usage() -> None:
    pairings = [inbound(CHAT, b"a" * 32), inbound(NOTES, b"b" * 32),
                inbound(CHAT, b"c" * 32, device="dvtablet"),
                Pairing(peer_device_id="dvpeer", peer_device_name="Peer", key=b"o" * 32, via="lan-handshake",
                        paired_at=NOW, role="outbound", our_app_id=ME)]
    keys = [ApiKey(id="k1", app_id="com.acme.agent", name="", digest="x"),
            ApiKey(id="k2", app_id="com.acme.agent", name="", digest="y", revoked_ms=NOW)]
    usage = [{"day": "2026-11-30", "appId": CHAT, "deviceId": PHONE.device_id, "model": "sim", "requests": 3,
              "promptTokens": 30, "completionTokens": 12},
             {"day": "2026-11-30", "appId": "com.acme.agent", "deviceId": "apikey:k1", "model": "sim",
              "requests": 2, "promptTokens": 5, "completionTokens": 5}]
    apps = {a["appId"]: a for a in apps_json(pairings, keys, usage, now_ms=NOW)}
    assert sorted(apps) == ["com.acme.agent", CHAT, NOTES]
    assert apps[CHAT]["pairedDevices"] == sorted([PHONE.device_id, "dvtablet"])
    assert apps[CHAT]["usage"] == {"requests": 3, "promptTokens": 30, "completionTokens": 12}
    assert apps["com.acme.agent"]["activeKeys"] == ["k1"] and apps["com.acme.agent"]["keys"] == 2
    assert apps["com.acme.agent"]["seenOn"] == ["apikey:k1"] and apps[NOTES]["usage"]["requests"] == 0
    devices = {d["deviceId"]: d for d in devices_json(pairings, usage)}
    assert [a["appId"] for a in devices[PHONE.device_id]["apps"]] == [CHAT, NOTES]
    assert devices[PHONE.device_id]["usage"]["requests"] == 3 and devices[PHONE.device_id]["seenApps"] == [CHAT]
    assert devices["dvpeer"]["apps"] == [] and devices["dvpeer"]["outbound"] is True
    assert devices["apikey:k1"]["deviceName"] is None and devices["apikey:k1"]["seenApps"] == ["com.acme.agent"]


# --------------------------------------------------------------------------
# The CLI's pure parts


def test_keys_create_flags_become_the_admin_request() -> None:
    from node.cli import build_parser
    from node.cli.hub import key_request

    args = build_parser().parse_args(["keys", "create", "--app", "com.acme.agent", "--name", "ci", "--models",
                                      "sim, other", "--no-offload", "--expires-in", "3600"])
    assert key_request(args) == {"appId": "com.acme.agent", "name": "ci", "expiresIn": 3600.0,
                                 "scopes": {"models": ["sim", "other"], "offload": False}}
    bare = build_parser().parse_args(["keys", "create", "--app", "a"])
    assert key_request(bare) == {"appId": "a", "name": ""}
    from node.cli.client import AdminError

    with pytest.raises(AdminError, match="--app"):
        key_request(build_parser().parse_args(["keys", "create"]))


def test_serve_prints_what_hub_mode_does() -> None:
    from node.cli.serve import hub_summary

    assert hub_summary(load_config(None, env={})) == []
    local = hub_summary(load_config(None, env={}, overrides={"hub": {"enabled": True}}))
    assert local[0].startswith("hub mode: pairing per app (device policy prompt; app rules: none), 2 quota rule(s)")
    assert "only this machine can reach the node" in local[1]
    lan = hub_summary(load_config(None, env={}, overrides={
        "hub": {"enabled": True}, "http_bind_host": "0.0.0.0",
        "security": {"app_pairing": [{"app_id": CHAT, "policy": "allow"}]}}))
    assert len(lan) == 1 and f"app rules: {CHAT}=allow" in lan[0]
