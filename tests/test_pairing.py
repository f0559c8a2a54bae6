"""Pairing: the store, the approval policies and hook, the handshake handler and client."""

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
    DVAIError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
)
from node.common.messages import handshake_proof_message
from node.config import SecurityConfig
from node.identity import DeviceIdentity
from node.pairing.approval import PairingApprover, PairingRequest, TokenBuckets
from node.pairing.handshake import handle_handshake, make_handshake_proof, pair_with
from node.pairing.store import (
    PAIRINGS_FILE,
    STORE_FORMAT_VERSION,
    Pairing,
    PairingStore,
    PairingStoreError,
    decode_key,
    encode_key,
)
from node.security.signing import NonceCache, sign_with_pairing, verify_signed_request

NOW = 1_778_184_673_778
PEER = "phone-pixel-9"
ME = "dv-this-node"
BODY = {"peerDeviceId": PEER, "peerDeviceName": "Pixel 9", "appId": "com.acme.chat", "via": "lan-handshake"}
NODE_ID = "dvthisnodeaaaaaaaaaaaaaaaaaaaaaaaa"
"""the device id of the node answering the handshakes (proofs must name it)."""
PHONE = DeviceIdentity.from_private_key(Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))
OTHER = DeviceIdentity.from_private_key(Ed25519PrivateKey.from_private_bytes(b"\x02" * 32))


def proven_body(identity: DeviceIdentity = PHONE, target: str = NODE_ID, at: int = NOW, **extra: Any) -> dict[str, Any]:
    """A handshake from ``identity`` with a proof bound to ``target`` at ``at`` (unix ms)."""
    return {**BODY, "peerDeviceId": identity.device_id, **make_handshake_proof(identity, target, at), **extra}


def clock() -> int:
    return NOW


def make_pairing(device: str = PEER, role: str = "inbound", key: bytes = b"k" * 32, **extra: Any) -> Pairing:
    return Pairing(peer_device_id=device, peer_device_name="Pixel 9", key=key, via="lan-handshake",
                   paired_at=NOW, role=role, **app_ids(role, "com.acme.chat"), **extra)  # type: ignore[arg-type]


def app_ids(role: str, app: str) -> dict[str, str]:
    """The app id fields a pairing of ``role`` carries, both set to ``app``."""
    ids = {}
    if role in ("outbound", "mutual"):
        ids["our_app_id"] = app
    if role in ("inbound", "mutual"):
        ids["peer_app_id"] = app
    return ids


async def handshake(approver: PairingApprover, store: PairingStore, body: object = None,
                    remote: str = "192.168.1.20") -> dict[str, Any]:
    return await handle_handshake(BODY if body is None else body, remote=remote, approver=approver,
                                  store=store, node_device_id=NODE_ID, now=clock)


@pytest.fixture
def store(tmp_path: Path) -> PairingStore:
    return PairingStore(tmp_path / PAIRINGS_FILE)


# --------------------------------------------------------------------------
# Keys and records


def test_key_encoding_is_unpadded_base64url_of_256_bits() -> None:
    key = bytes(range(250, 256)) + bytes(26)
    text = encode_key(key)
    assert "=" not in text and "+" not in text and "/" not in text and len(text) == 43
    assert decode_key(text) == key
    assert decode_key(text + "=") == key
    for bad in ["", "abc", encode_key(bytes(16)), encode_key(bytes(33)), "!" * 43, None]:
        with pytest.raises(ValueError):
            decode_key(bad)  # type: ignore[arg-type]


def test_pairing_hides_its_key_and_validates() -> None:
    pairing = make_pairing()
    assert "kkkk" not in repr(pairing) and "pairingKey" not in pairing.to_public_json()
    assert Pairing.from_json(pairing.to_json()) == pairing
    with pytest.raises(ValueError):
        make_pairing(key=b"short")
    with pytest.raises(ValueError):
        make_pairing(role="sideways")
    with pytest.raises(ValueError, match="peer_app_id"):
        Pairing.from_json({k: v for k, v in pairing.to_json().items() if k != "peerAppId"})
    with pytest.raises(ValueError, match="our_app_id"):  # an inbound key never signs our requests
        Pairing.from_json({**pairing.to_json(), "ourAppId": "com.acme.chat"})


# --------------------------------------------------------------------------
# The store


async def test_store_survives_restart_with_mode_0600(store: PairingStore, tmp_path: Path) -> None:
    await store.add(make_pairing())
    await store.add(make_pairing("laptop", role="outbound", key=b"o" * 32, base_url="http://10.0.0.2:38883"))
    path = tmp_path / PAIRINGS_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reloaded = await PairingStore.load(tmp_path, self_device_id=ME)
    assert reloaded.list() == store.list() == PairingStore.load_sync(tmp_path, self_device_id=ME).list()
    assert reloaded.get(PEER) == make_pairing()
    assert reloaded.get("laptop") is None
    assert reloaded.get("laptop", direction="outbound").base_url == "http://10.0.0.2:38883"  # type: ignore[union-attr]


async def test_missing_file_is_an_empty_store(tmp_path: Path) -> None:
    assert (await PairingStore.load(tmp_path / "new", self_device_id=ME)).list() == []


@pytest.mark.parametrize("content", [
    b"{not json", b"[]", b'{"version": 1}', b'{"version": 99, "pairings": []}',
    b'{"version": 1, "pairings": [{"peerDeviceId": "x"}]}', b"\xff\xfe",
])
async def test_corrupt_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / PAIRINGS_FILE).write_bytes(content)
    with pytest.raises(PairingStoreError, match="move it aside"):
        await PairingStore.load(tmp_path, self_device_id=ME)
    assert (tmp_path / PAIRINGS_FILE).read_bytes() == content  # never silently replaced


async def test_loose_file_mode_is_tightened(store: PairingStore, tmp_path: Path) -> None:
    await store.add(make_pairing())
    os.chmod(tmp_path / PAIRINGS_FILE, 0o644)
    await PairingStore.load(tmp_path, self_device_id=ME)
    assert stat.S_IMODE(os.stat(tmp_path / PAIRINGS_FILE).st_mode) == 0o600


async def test_revoke_is_immediate_and_persisted(store: PairingStore, tmp_path: Path) -> None:
    await store.add(make_pairing())
    await store.add(make_pairing(role="outbound", key=b"o" * 32))
    task = asyncio.ensure_future(store.revoke(PEER))
    await asyncio.sleep(0)  # the revoke started but its file write has not finished
    assert store.get(PEER) is None
    removed = await task
    assert len(removed) == 2
    assert (await PairingStore.load(tmp_path, self_device_id=ME)).list() == []
    with pytest.raises(NotFoundError):
        await store.revoke(PEER)


async def test_directions_and_mutual_pairings(store: PairingStore) -> None:
    mutual = make_pairing(role="mutual", key=b"m" * 32)
    await store.add(mutual)
    assert store.get(PEER) is mutual and store.get(PEER, direction="outbound") is mutual
    assert len(store.list()) == 1
    await store.add(make_pairing(role="inbound", key=b"i" * 32))  # a new handshake replaces one direction
    assert store.get(PEER).key == b"i" * 32  # type: ignore[union-attr]
    outbound = store.get(PEER, direction="outbound")
    assert outbound is not None and outbound.key == b"m" * 32 and outbound.role == "outbound"
    assert len(store.list()) == 2


async def test_admin_flag(store: PairingStore, tmp_path: Path) -> None:
    await store.add(make_pairing())
    await store.set_admin(PEER, True)
    assert (await PairingStore.load(tmp_path, self_device_id=ME)).get(PEER).admin  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        await store.set_admin("nobody", True)


async def test_concurrent_writes_leave_the_latest_state(store: PairingStore, tmp_path: Path) -> None:
    await asyncio.gather(*(store.add(make_pairing(f"dev-{i}")) for i in range(20)))
    await store.revoke("dev-3")
    on_disk = json.loads((tmp_path / PAIRINGS_FILE).read_text())
    assert sorted(p["peerDeviceId"] for p in on_disk["pairings"]) == sorted(f"dev-{i}" for i in range(20) if i != 3)


# --------------------------------------------------------------------------
# Policies


async def test_deny_is_the_default(store: PairingStore) -> None:
    approver = PairingApprover.from_config(SecurityConfig())
    with pytest.raises(PermissionDeniedError) as caught:
        await handshake(approver, store)
    assert caught.value.status == 403 and caught.value.code == "pairing_denied"
    assert store.list() == []


async def test_allowlist_with_a_valid_proof(store: PairingStore) -> None:
    approver = PairingApprover.from_config(
        SecurityConfig(pairing_policy="allowlist", pairing_allowlist=(PHONE.device_id,)))
    answer = await handshake(approver, store, proven_body())
    assert answer["paired"] is True and answer["peerDeviceId"] == PHONE.device_id
    assert answer["via"] == "lan-handshake" and answer["pairedAt"] == NOW
    stored = store.get(PHONE.device_id)
    assert stored is not None and stored.key == decode_key(answer["pairingKey"]) and stored.role == "inbound"
    assert stored.peer_app_id == "com.acme.chat" and stored.our_app_id is None
    # the window is +-300 s inclusive
    for at in (NOW - 300_000, NOW + 300_000):
        assert (await handshake(approver, store, proven_body(at=at)))["paired"]
    padded = proven_body(at=NOW - 1)  # clients whose base64url encoder pads are understood
    padded.update(publicKey=padded["publicKey"] + "=", proof=padded["proof"] + "==")
    assert (await handshake(approver, store, padded))["paired"]
    # a proven id that is not listed is still refused
    with pytest.raises(PermissionDeniedError) as caught:
        await handshake(approver, store, proven_body(OTHER))
    assert caught.value.code == "not_in_allowlist"


async def test_a_captured_proof_cannot_be_replayed(store: PairingStore) -> None:
    approver = PairingApprover.from_config(
        SecurityConfig(pairing_policy="allowlist", pairing_allowlist=(PHONE.device_id,)))
    body = proven_body()
    assert (await handshake(approver, store, body))["paired"]
    padded = {**body, "proof": body["proof"] + "=="}
    for replay in (body, padded):
        with pytest.raises(AuthenticationError) as caught:
            await handshake(approver, store, replay)
        assert caught.value.status == 401 and caught.value.code == "device_proof_replayed"
    assert (await handshake(approver, store, proven_body(at=NOW + 1)))["paired"]  # a fresh proof is fine


async def test_allowlist_refuses_a_claimed_id_without_proof(store: PairingStore) -> None:
    approver = PairingApprover(policy="allowlist", allowlist=[PHONE.device_id, PEER])
    for device in (PHONE.device_id, PEER, "stranger"):  # listed or not: the same answer, nothing leaks
        with pytest.raises(PermissionDeniedError) as caught:
            await handshake(approver, store, {**BODY, "peerDeviceId": device})
        assert caught.value.status == 403 and caught.value.code == "device_proof_required"
        assert "prove" in str(caught.value) and "proof" in str(caught.value)
    assert store.list() == []


def _swap(body: dict[str, Any], name: str, value: object) -> dict[str, Any]:
    return {**body, name: value}


@pytest.mark.parametrize("make_body,code", [
    # OTHER's key and signature, PHONE's id: the key does not derive the id
    (lambda: _swap(proven_body(OTHER), "peerDeviceId", PHONE.device_id), "device_proof_invalid"),
    # PHONE's public key, a signature made by OTHER
    (lambda: _swap(proven_body(), "proof", make_handshake_proof(OTHER, NODE_ID, NOW)["proof"]),
     "device_proof_invalid"),
    (lambda: proven_body(target="dvsomeothernodeaaaaaaaaaaaaaaaaaaa"), "device_proof_invalid"),  # replayed
    (lambda: _swap(proven_body(), "proofTimestamp", NOW + 1), "device_proof_invalid"),  # not what was signed
    (lambda: proven_body(at=NOW - 300_001), "device_proof_expired"),
    (lambda: proven_body(at=NOW + 300_001), "device_proof_expired"),
    (lambda: _swap(proven_body(), "proof", "!" * 86), "device_proof_invalid"),
    (lambda: _swap(proven_body(), "proof", proven_body()["proof"][:40] + "." + proven_body()["proof"][41:]),
     "device_proof_invalid"),
    (lambda: _swap(proven_body(), "proof", proven_body()["proof"] + "==="), "device_proof_invalid"),
    (lambda: _swap(proven_body(), "proof", proven_body()["proof"][:-4]), "device_proof_invalid"),
    (lambda: _swap(proven_body(), "publicKey", "A" * 5000), "device_proof_invalid"),
    (lambda: _swap(proven_body(), "publicKey", "not base64 at all"), "device_proof_invalid"),
])
async def test_bad_proofs_are_refused(store: PairingStore, make_body: Any, code: str) -> None:
    approver = PairingApprover(policy="allowlist", allowlist=[PHONE.device_id])
    with pytest.raises(AuthenticationError) as caught:
        await handshake(approver, store, make_body())
    assert caught.value.status == 401 and caught.value.code == code and store.list() == []


def test_proof_message_layout_is_fixed() -> None:
    assert handshake_proof_message("dva", "dvb", 1778184673778) == b"dvai-handshake-v1\ndva\ndvb\n1778184673778"


async def test_app_id_falls_back_to_device_id(store: PairingStore) -> None:
    approver = PairingApprover(policy="allowlist", allowlist=[PHONE.device_id])
    body = {k: v for k, v in proven_body().items() if k != "appId"}
    await handshake(approver, store, body)
    assert store.get(PHONE.device_id).peer_app_id == PHONE.device_id  # type: ignore[union-attr]


async def wait_pending(approver: PairingApprover) -> PairingRequest:
    for _ in range(200):
        if approver.pending():
            return approver.pending()[0]
        await asyncio.sleep(0.005)
    raise AssertionError("no pending request appeared")


async def test_prompt_approve(store: PairingStore) -> None:
    approver = PairingApprover(policy="prompt")
    task = asyncio.create_task(handshake(approver, store))
    request = await wait_pending(approver)
    assert request.id == PEER and request.remote == "192.168.1.20" and request.to_json()["appId"] == "com.acme.chat"
    assert request.proven is False and request.to_json()["proven"] is False
    approver.approve(request.id)
    answer = await task
    assert answer["paired"] and store.get(PEER) is not None and approver.pending() == []
    with pytest.raises(NotFoundError):
        approver.approve(PEER)


async def test_prompt_shows_a_proven_id(store: PairingStore) -> None:
    approver = PairingApprover(policy="prompt")
    task = asyncio.create_task(handshake(approver, store, proven_body()))
    request = await wait_pending(approver)
    assert request.id == PHONE.device_id and request.proven is True and request.to_json()["proven"] is True
    approver.approve(request.id)
    assert (await task)["paired"]


async def test_prompt_deny(store: PairingStore) -> None:
    approver = PairingApprover(policy="prompt")
    task = asyncio.create_task(handshake(approver, store))
    approver.deny((await wait_pending(approver)).id)
    with pytest.raises(PermissionDeniedError) as caught:
        await task
    assert caught.value.code == "denied_by_operator" and store.list() == []


async def test_prompt_timeout_denies(store: PairingStore) -> None:
    approver = PairingApprover(policy="prompt", prompt_timeout_s=0.05)
    with pytest.raises(PermissionDeniedError) as caught:
        await handshake(approver, store)
    assert caught.value.code == "pairing_timed_out" and approver.pending() == []


async def test_one_pending_request_per_peer(store: PairingStore) -> None:
    approver = PairingApprover(policy="prompt")
    task = asyncio.create_task(handshake(approver, store))
    await wait_pending(approver)
    with pytest.raises(RateLimitedError) as caught:
        await handshake(approver, store, remote="192.168.1.21")
    assert caught.value.status == 429 and caught.value.code == "pairing_already_pending"
    assert int(caught.value.headers["Retry-After"]) >= 1
    approver.close()
    with pytest.raises(PermissionDeniedError):
        await task


async def test_a_proven_request_displaces_an_unproven_claim_to_the_same_id(store: PairingStore) -> None:
    approver = PairingApprover(policy="prompt")
    squatter = asyncio.create_task(handshake(approver, store, {**BODY, "peerDeviceId": PHONE.device_id},
                                             remote="192.168.1.66"))
    await wait_pending(approver)
    genuine = asyncio.create_task(handshake(approver, store, proven_body(), remote="192.168.1.21"))
    for _ in range(100):
        if [r.proven for r in approver.pending()] == [True]:
            break
        await asyncio.sleep(0.01)
    assert [(r.peer_device_id, r.proven) for r in approver.pending()] == [(PHONE.device_id, True)]
    with pytest.raises(PermissionDeniedError):
        await squatter  # the bare claim was denied
    approver.approve(PHONE.device_id)
    assert (await genuine)["paired"]
    # the reverse is still refused: a bare claim cannot displace a proven request
    task = asyncio.create_task(handshake(approver, store, proven_body(at=NOW + 5)))
    await wait_pending(approver)
    with pytest.raises(RateLimitedError):
        await handshake(approver, store, {**BODY, "peerDeviceId": PHONE.device_id}, remote="192.168.1.66")
    approver.close()
    with pytest.raises(PermissionDeniedError):
        await task


async def test_pending_requests_are_capped(store: PairingStore) -> None:
    approver = PairingApprover(policy="prompt", max_pending=2, rate_per_minute=600, burst=50)
    tasks = [asyncio.create_task(handshake(approver, store, {**BODY, "peerDeviceId": f"d{i}"})) for i in range(2)]
    for _ in range(200):
        if len(approver.pending()) == 2:
            break
        await asyncio.sleep(0.005)
    with pytest.raises(RateLimitedError, match="too many"):
        await handshake(approver, store, {**BODY, "peerDeviceId": "d9"})
    approver.close()
    for task in tasks:
        with pytest.raises(PermissionDeniedError):
            await task


# --------------------------------------------------------------------------
# The hook


@pytest.mark.parametrize("answer,approved", [(True, True), (False, False), ({"approved": False}, False),
                                             ({"approved": True}, True)])
async def test_sync_hook(store: PairingStore, answer: object, approved: bool) -> None:
    seen: list[PairingRequest] = []

    def hook(request: PairingRequest) -> object:
        seen.append(request)
        return answer

    approver = PairingApprover(policy="deny", hook=hook)  # type: ignore[arg-type]
    if approved:
        assert (await handshake(approver, store))["paired"]
    else:
        with pytest.raises(PermissionDeniedError):
            await handshake(approver, store)
    assert seen[0].peer_device_id == PEER and seen[0].peer_device_name == "Pixel 9" and not seen[0].proven


async def test_a_blocking_sync_hook_does_not_stall_the_event_loop(store: PairingStore) -> None:
    def slow_dialog(request: PairingRequest) -> bool:
        time.sleep(0.3)  # a host app asking its user, synchronously
        return True

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    running = asyncio.create_task(ticker())
    try:
        assert (await handshake(PairingApprover(hook=slow_dialog), store))["paired"]
    finally:
        running.cancel()
    assert ticks >= 10  # the loop kept turning while the hook blocked


async def test_hook_sees_a_proven_id(store: PairingStore) -> None:
    seen: list[PairingRequest] = []
    approver = PairingApprover(hook=lambda request: seen.append(request) is None)
    await handshake(approver, store, proven_body())
    assert seen[0].peer_device_id == PHONE.device_id and seen[0].proven is True


async def test_async_hook_with_host_key(store: PairingStore) -> None:
    host_key = encode_key(b"H" * 32)

    async def hook(request: PairingRequest) -> dict[str, object]:
        await asyncio.sleep(0)
        return {"approved": True, "pairing_key": host_key}

    answer = await handshake(PairingApprover(hook=hook), store)
    assert answer["pairingKey"] == host_key and store.get(PEER).key == b"H" * 32  # type: ignore[union-attr]


async def test_hook_accepts_reference_camel_case_key(store: PairingStore) -> None:
    key = encode_key(b"C" * 32)
    answer = await handshake(PairingApprover(hook=lambda r: {"approved": True, "pairingKey": key}), store)
    assert answer["pairingKey"] == key


@pytest.mark.parametrize("hook", [
    lambda r: 1 / 0,
    lambda r: {"approved": True, "pairing_key": "too-short"},
    lambda r: "yes",
    lambda r: {"approve": True},
])
async def test_broken_hook_denies(store: PairingStore, hook: Any) -> None:
    with pytest.raises(PermissionDeniedError) as caught:
        await handshake(PairingApprover(policy="allowlist", allowlist=[PEER], hook=hook), store)
    assert caught.value.code == "pairing_hook_failed" and store.list() == []


async def test_slow_hook_times_out(store: PairingStore) -> None:
    async def hook(request: PairingRequest) -> bool:
        await asyncio.sleep(10)
        return True

    with pytest.raises(PermissionDeniedError) as caught:
        await handshake(PairingApprover(hook=hook, prompt_timeout_s=0.05), store)
    assert caught.value.code == "pairing_timed_out"


# --------------------------------------------------------------------------
# Input validation and rate limits


@pytest.mark.parametrize("body,param", [
    (None, None), ([1], None), ("x", None),
    ({"peerDeviceName": "x"}, "peerDeviceId"),
    ({**BODY, "peerDeviceId": ""}, "peerDeviceId"),
    ({**BODY, "peerDeviceId": 7}, "peerDeviceId"),
    ({**BODY, "peerDeviceId": "has space"}, "peerDeviceId"),
    ({**BODY, "peerDeviceId": "x" * 129}, "peerDeviceId"),
    ({**BODY, "peerDeviceName": None}, "peerDeviceName"),
    ({**BODY, "peerDeviceName": "bad\nname"}, "peerDeviceName"),
    ({**BODY, "appId": "a\tb"}, "appId"),
    ({**BODY, "via": "rendezvous"}, "via"),
    ({**BODY, "publicKey": "AAAA"}, "proofTimestamp"),  # a proof is all three fields or none
    ({k: v for k, v in proven_body().items() if k != "proof"}, "proof"),
    (proven_body(proofTimestamp="1778184673778"), "proofTimestamp"),
    (proven_body(proofTimestamp=True), "proofTimestamp"),
    (proven_body(proof=12), "proof"),
])
async def test_bad_handshake_bodies_are_400(store: PairingStore, body: object, param: str | None) -> None:
    approver = PairingApprover(policy="allowlist", allowlist=[PEER])
    with pytest.raises(InvalidRequestError) as caught:
        await handle_handshake(body, remote="10.0.0.9", approver=approver, store=store, node_device_id=NODE_ID,
                               now=clock)
    assert caught.value.status == 400 and caught.value.param == param


async def test_handshake_burst_gets_429_with_retry_after(store: PairingStore) -> None:
    approver = PairingApprover(policy="deny", rate_per_minute=10, burst=3)
    for _ in range(3):
        with pytest.raises(PermissionDeniedError):
            await handshake(approver, store)
    with pytest.raises(RateLimitedError) as caught:
        await handshake(approver, store)
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "6"
    # the same device from another address is limited by its device id too
    with pytest.raises(RateLimitedError):
        await handshake(approver, store, remote="192.168.1.99")


def test_token_buckets_refill_and_stay_bounded() -> None:
    buckets = TokenBuckets(capacity=2, per_second=1.0, max_keys=3)
    assert buckets.take("a", 0.0) == 0.0 and buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == pytest.approx(1.0)
    assert buckets.take("a", 1.0) == 0.0
    buckets.take("b", 1.0)
    buckets.take("c", 1.0)
    assert buckets.take("d", 1.0) > 0  # every tracked key busy: newcomers wait
    assert buckets.take("d", 10.0) == 0.0  # refilled buckets are forgotten to make room
    assert len(buckets) <= 3


# --------------------------------------------------------------------------
# The client, against a real handshake endpoint


async def test_pair_with_a_real_peer(aiohttp_server: Any, tmp_path: Path) -> None:
    peer_store = PairingStore(tmp_path / "peer" / PAIRINGS_FILE)
    me, stranger = DeviceIdentity.generate(), DeviceIdentity.generate()
    approver = PairingApprover(policy="allowlist", allowlist=[me.device_id])
    app = web.Application()
    reported = {"deviceId": "dv-peer", "deviceName": "Big Box"}  # what health says; the handler is "dv-peer"

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "loading", **reported}, status=503)

    async def handshake_handler(request: web.Request) -> web.Response:
        try:
            answer = await handle_handshake(await request.json(), remote=request.remote or "",
                                            approver=approver, store=peer_store, node_device_id="dv-peer")
        except DVAIError as exc:
            return web.json_response(exc.to_body(), status=exc.status, headers=exc.headers)
        return web.json_response(answer)

    app.router.add_get("/v1/dvai/health", health)
    app.router.add_post("/v1/dvai/handshake", handshake_handler)
    server = await aiohttp_server(app)
    my_store = PairingStore(tmp_path / "me" / PAIRINGS_FILE)
    async with aiohttp.ClientSession() as session:
        pairing = await pair_with(session, str(server.make_url("")), identity=me,
                                  my_device_name="Laptop", app_id="dvai-node", store=my_store)
        assert pairing.peer_device_id == "dv-peer" and pairing.peer_device_name == "Big Box"
        assert pairing.role == "outbound" and my_store.get("dv-peer", direction="outbound") == pairing
        inbound = peer_store.get(me.device_id)
        assert inbound is not None and inbound.key == pairing.key and inbound.peer_app_id == "dvai-node"
        # the stored key signs requests the peer accepts
        headers = sign_with_pairing(pairing, me.device_id, "GET", "/v1/models", b"")
        attribution = verify_signed_request(headers, "GET", "/v1/models", b"", lookup_key=peer_store.credential_for,
                                            nonces=NonceCache(), now_ms=int(headers["X-DVAI-Nonce"].split(".")[0]))
        assert attribution.signed and attribution.app_id == "dvai-node"
        with pytest.raises(PermissionDeniedError) as caught:
            await pair_with(session, str(server.make_url("")), identity=stranger,
                            my_device_name="?", store=my_store)
        assert caught.value.code == "not_in_allowlist"
        # the proof names the device id health reported: a node with another id refuses it (401)
        reported["deviceId"] = "dv-elsewhere"
        with pytest.raises(AuthenticationError) as refused:
            await pair_with(session, str(server.make_url("")), identity=me, my_device_name="Laptop",
                            store=my_store)
        assert refused.value.status == 401 and refused.value.code == "device_proof_invalid"


# --------------------------------------------------------------------------
# App ids per direction: every kind of pairing signs and verifies through one path


def _verify_with(store: PairingStore, headers: dict[str, str], body: bytes = b"{}") -> object:
    return verify_signed_request(headers, "POST", "/v1/chat/completions", body, lookup_key=store.credential_for,
                                 nonces=NonceCache(), now_ms=int(headers["X-DVAI-Nonce"].split(".")[0]))


async def test_every_kind_of_pairing_signs_in_the_directions_it_allows(tmp_path: Path) -> None:
    """Each side signs with *its own* record (``sign_with_pairing``) and the other side verifies with
    *its own* store, as the forwarder and the security middleware do."""
    a, b = "dv-node-a", "dv-node-b"
    key_lan, key_qr, key_static = b"l" * 32, b"q" * 32, b"s" * 32
    a_store = PairingStore(tmp_path / "a" / PAIRINGS_FILE)
    b_store = PairingStore(tmp_path / "b" / PAIRINGS_FILE)
    # LAN: A ran the handshake against B under app id com.acme.chat
    await a_store.add(Pairing(peer_device_id=b, peer_device_name="B", key=key_lan, via="lan-handshake",
                              paired_at=NOW, role="outbound", our_app_id="com.acme.chat"))
    await b_store.add(Pairing(peer_device_id=a, peer_device_name="A", key=key_lan, via="lan-handshake",
                              paired_at=NOW, role="inbound", peer_app_id="com.acme.chat"))
    lan = sign_with_pairing(a_store.get(b, direction="outbound"), a, "POST",  # type: ignore[arg-type]
                            "/v1/chat/completions", b"{}")
    assert lan["X-DVAI-App-Id"] == "com.acme.chat"
    assert _verify_with(b_store, lan).app_id == "com.acme.chat"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="does not let us call"):  # B holds the inbound half only
        sign_with_pairing(b_store.get(a), b, "POST", "/v1/chat/completions", b"{}")  # type: ignore[arg-type]

    # QR (mutual, via rendezvous): each side signs as its own device id, expects the other's
    for store, me, peer, key in ((a_store, a, b, key_qr), (b_store, b, a, key_qr)):
        await store.add(Pairing(peer_device_id=peer, peer_device_name=peer, key=key, via="rendezvous",
                                paired_at=NOW, role="mutual", our_app_id=me, peer_app_id=peer))
    for signer, signer_store, verifier_store, target in ((a, a_store, b_store, b), (b, b_store, a_store, a)):
        headers = sign_with_pairing(signer_store.get(target, direction="outbound"), signer,  # type: ignore[arg-type]
                                    "POST", "/v1/chat/completions", b"{}")
        assert headers["X-DVAI-App-Id"] == signer
        attribution = _verify_with(verifier_store, headers)
        assert attribution.peer_device_id == signer and attribution.app_id == signer  # type: ignore[attr-defined]

    # static (mutual, configured): one app id both ways
    for store, peer in ((a_store, b), (b_store, a)):
        await store.add(Pairing(peer_device_id=peer, peer_device_name=peer, key=key_static, via="static",
                                paired_at=NOW, role="mutual", our_app_id="ops", peer_app_id="ops"))
    headers = sign_with_pairing(b_store.get(a, direction="outbound"), b, "POST",  # type: ignore[arg-type]
                                "/v1/chat/completions", b"{}")
    assert _verify_with(a_store, headers).app_id == "ops"  # type: ignore[attr-defined]


async def test_a_mutual_pairing_half_replaced_keeps_only_the_other_directions_app_id(store: PairingStore) -> None:
    await store.add(make_pairing(role="mutual"))
    await store.add(Pairing(peer_device_id=PEER, peer_device_name="P", key=b"o" * 32, via="lan-handshake",
                            paired_at=NOW, role="outbound", our_app_id="new-app"))
    inbound = store.get(PEER)
    assert inbound is not None and inbound.role == "inbound" and inbound.our_app_id is None
    assert inbound.peer_app_id == "com.acme.chat"
    assert store.get(PEER, direction="outbound").our_app_id == "new-app"  # type: ignore[union-attr]


def test_version_1_stores_are_migrated_and_rewritten(tmp_path: Path) -> None:
    """Version 1's single ``appId`` meant the app id *we* sign as for outbound records and the one
    the *peer* signs as otherwise; a QR pairing stored the peer's device id there."""
    key = encode_key(b"m" * 32)
    common = {"peerDeviceName": "x", "pairingKey": key, "pairedAt": NOW, "admin": False}
    v1 = {"version": 1, "pairings": [
        {**common, "peerDeviceId": "dv-in", "appId": "com.in", "via": "lan-handshake", "role": "inbound"},
        {**common, "peerDeviceId": "dv-out", "appId": "com.out", "via": "lan-handshake", "role": "outbound",
         "baseUrl": "http://10.0.0.9:38883/v1"},
        {**common, "peerDeviceId": "dv-qr", "appId": "dv-qr", "via": "rendezvous", "role": "mutual"},
        {**common, "peerDeviceId": "dv-static", "appId": "ops", "via": "static", "role": "mutual"},
    ]}
    (tmp_path / PAIRINGS_FILE).write_text(json.dumps(v1))
    store = PairingStore.load_sync(tmp_path, self_device_id=ME)
    ids = {p.peer_device_id: (p.our_app_id, p.peer_app_id) for p in store.list()}
    assert ids == {"dv-in": (None, "com.in"), "dv-out": ("com.out", None), "dv-qr": (ME, "dv-qr"),
                   "dv-static": ("ops", "ops")}
    rewritten = json.loads((tmp_path / PAIRINGS_FILE).read_text())
    assert rewritten["version"] == STORE_FORMAT_VERSION == 3 and all("appId" not in p for p in rewritten["pairings"])
    assert stat.S_IMODE(os.stat(tmp_path / PAIRINGS_FILE).st_mode) == 0o600
    assert PairingStore.load_sync(tmp_path, self_device_id="someone-else").list() == store.list()
