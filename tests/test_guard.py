"""Safe exposure: the pure policy functions and the middleware on a small real aiohttp app."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from node.common.errors import DVAIError
from node.config import NodeConfig, SecurityConfig
from node.pairing.store import Pairing, PairingStore
from node.security.guard import (
    ATTRIBUTION_KEY,
    attribution_of,
    audit_peer_of,
    exposure_warnings,
    host_allowed,
    is_exposed,
    is_loopback,
    make_security_middleware,
    pairing_required,
    split_host,
)
from node.security.signing import (
    HEADER_APP_ID,
    HEADER_NONCE,
    HEADER_PEER_DEVICE_ID,
    SIGNED_HEADERS,
    NonceCache,
    new_nonce,
    path_with_query_of,
    sign_request_headers,
)

REPO = Path(__file__).resolve().parent.parent
NOW = 1_778_184_673_778
KEY = bytes(range(32))
ADMIN_KEY = bytes(range(32, 64))
PEER, APP = "dv-peer", "com.acme.chat"
LAN = "192.168.1.20"
REMOTE_HEADER = "X-Test-Remote-Addr"
"""Test seam: the middleware's injectable ``remote_addr`` reads the caller's address from here, so
one loopback test server can play LAN callers. test_exposed_node_in_a_network_namespace checks
the real socket address instead."""


# --------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("192.168.1.20", False), ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False),
    ("0.0.0.0", False), ("localhost", False), ("", False), (None, False), ("garbage", False),
])
def test_is_loopback(address: str | None, expected: bool) -> None:
    assert is_loopback(address) is expected


@pytest.mark.parametrize("bind,exposed", [
    ("127.0.0.1", False), ("::1", False), ("localhost", False), ("0.0.0.0", True), ("::", True),
    ("192.168.1.5", True), ("", True), ("mybox.lan", True),
])
def test_is_exposed(bind: str, exposed: bool) -> None:
    assert is_exposed(bind) is exposed


@pytest.mark.parametrize("security,bind,required", [
    (SecurityConfig(), "127.0.0.1", False),
    (SecurityConfig(), "0.0.0.0", True),
    (SecurityConfig(allow_anonymous_lan=True), "0.0.0.0", False),
    (SecurityConfig(allow_anonymous_lan=True, require_pairing=True), "0.0.0.0", True),
    (SecurityConfig(require_pairing=True), "127.0.0.1", True),
    (SecurityConfig(require_pairing=False), "0.0.0.0", False),
])
def test_pairing_required(security: SecurityConfig, bind: str, required: bool) -> None:
    assert pairing_required(security, bind) is required


def test_exposure_warnings() -> None:
    assert exposure_warnings(NodeConfig()) == []
    assert exposure_warnings(NodeConfig(http_bind_host="0.0.0.0")) == []
    loud = exposure_warnings(NodeConfig(http_bind_host="0.0.0.0", security=SecurityConfig(allow_anonymous_lan=True)))
    assert len(loud) == 1 and "anyone on the LAN" in loud[0]


@pytest.mark.parametrize("header,host", [
    ("localhost:38883", "localhost"), ("LOCALHOST.", "localhost"), ("[::1]:80", "::1"), ("[::1]", "::1"),
    ("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("a.b.c:1", "a.b.c"),
    ("[::1", None), ("[evil]:80", None), ("host:port", None), ("a b", None), ("", None), (":80", None),
    ("user@host", None),
])
def test_split_host(header: str, host: str | None) -> None:
    assert split_host(header) == host


@pytest.mark.parametrize("header,allowed", [
    (None, True), ("localhost:1234", True), ("127.0.0.1:38883", True), ("[::1]:38883", True),
    ("192.168.1.5:38883", True), ("[fe80::1]:38883", True), ("mynode.lan:38883", True), ("x.corp.example", True),
    ("corp.example", True), ("evil.example", False), ("localhost.evil.example", False),
    ("mynode.lan.evil.example", False), ("", False), ("bad host", False),
])
def test_host_allowlist(header: str | None, allowed: bool) -> None:
    assert host_allowed(header, bind_host="0.0.0.0", allowed_hosts=("mynode.lan", ".corp.example")) is allowed


def test_bind_host_name_is_allowed() -> None:
    assert host_allowed("studio.local:38883", bind_host="studio.local", allowed_hosts=())
    assert not host_allowed("studio.local:38883", bind_host="0.0.0.0", allowed_hosts=())
    assert host_allowed("anything.example", bind_host="0.0.0.0", allowed_hosts=("*",))


# --------------------------------------------------------------------------
# The middleware on a real app


class Harness:
    def __init__(self, client: Any, store: PairingStore) -> None:
        self.client = client
        self.store = store

    async def call(self, method: str, path: str, *, remote: str = LAN, body: bytes = b"",
                   headers: dict[str, str] | None = None, sign: bool = False, key: bytes = KEY,
                   device: str = PEER, now_ms: int = NOW) -> tuple[int, dict[str, Any]]:
        all_headers = {REMOTE_HEADER: remote, **(headers or {})}
        if sign:
            all_headers.update(sign_request_headers(key, device, APP, method, path, body, now_ms=now_ms))
        async with self.client.request(method, path, data=body, headers=all_headers) as response:
            return response.status, await response.json()


def build_app(config: NodeConfig, store: PairingStore, **options: Any) -> web.Application:
    app = web.Application(client_max_size=4096, middlewares=[make_security_middleware(
        config, store, NonceCache(), now_ms=lambda: NOW,
        remote_addr=lambda request: request.headers.get(REMOTE_HEADER, request.remote),
        loopback_only_paths={"/v1/dvai/audit", "/v1/dvai/pairings/"}, **options,
    )])

    async def echo(request: web.Request) -> web.Response:
        attribution = attribution_of(request)
        raw = await request.read()  # after the middleware read it, aiohttp serves the cached bytes
        body = json.loads(raw) if raw else None
        return web.json_response({"peer": attribution.peer_device_id, "app": attribution.app_id,
                                  "signed": attribution.signed, "auditPeer": audit_peer_of(request),
                                  "body": body, "rawPath": request.raw_path})

    for path in ("/v1/models", "/v1/dvai/health", "/v1/dvai/audit"):
        app.router.add_get(path, echo)
    for path in ("/v1/chat/completions", "/v1/dvai/handshake", "/v1/dvai/pairings/{device_id}/revoke"):
        app.router.add_post(path, echo)
    return app


async def make_harness(aiohttp_client: Any, tmp_path: Path, config: NodeConfig | None = None,
                       **options: Any) -> Harness:
    store = PairingStore(tmp_path / "pairings.json")
    await store.add(Pairing(peer_device_id=PEER, peer_device_name="Peer", peer_app_id=APP, key=KEY,
                            via="lan-handshake", paired_at=NOW, role="inbound"))
    await store.add(Pairing(peer_device_id="dv-admin", peer_device_name="Admin", our_app_id=APP, peer_app_id=APP, key=ADMIN_KEY,
                            via="static", paired_at=NOW, role="mutual", admin=True))
    config = config or NodeConfig(http_bind_host="0.0.0.0", security=SecurityConfig(allowed_hosts=("mynode.lan",)))
    client = await aiohttp_client(build_app(config, store, **options))
    return Harness(client, store)


CHAT = b'{"model":"gemma3-270m","messages":[{"role":"user","content":"hi"}]}'


async def test_loopback_callers_need_no_signature(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    status, body = await harness.call("POST", "/v1/chat/completions", remote="127.0.0.1", body=CHAT)
    assert status == 200 and body["signed"] is False and body["app"] == "anonymous" and body["auditPeer"] == "self"


async def test_exposed_node_refuses_unsigned_lan_callers(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    status, body = await harness.call("POST", "/v1/chat/completions", body=CHAT)
    assert status == 401 and body["error"]["code"] == "signature_required"
    assert body["error"]["type"] == "authentication_error"


async def test_signed_lan_caller_is_attributed_and_body_still_readable(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    status, body = await harness.call("POST", "/v1/chat/completions", body=CHAT, sign=True)
    assert status == 200
    assert (body["peer"], body["app"], body["signed"], body["auditPeer"]) == (PEER, APP, True, PEER)
    assert body["body"]["model"] == "gemma3-270m"


async def test_signed_query_string_round_trips_through_aiohttp(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    url = harness.client.make_url("/v1/models?q=a b&x=%C3%A9&y=1")
    target = path_with_query_of(url)
    headers = {REMOTE_HEADER: LAN, **sign_request_headers(KEY, PEER, APP, "GET", target, b"", now_ms=NOW)}
    async with harness.client.session.get(url, headers=headers) as response:
        body = await response.json()
    assert response.status == 200 and body["signed"] and body["rawPath"] == target


def tamper(headers: dict[str, str], name: str, value: str | None) -> dict[str, str]:
    changed = dict(headers)
    if value is None:
        del changed[name]
    else:
        changed[name] = value
    return changed


MATRIX: dict[str, tuple[str, int, str]] = {
    # case: (what changes, expected status, expected code)
    **{f"missing {h}": (h, 401, "incomplete_signature_headers") for h in SIGNED_HEADERS},
    "method": ("method", 401, "bad_signature"),
    "path": ("path", 401, "bad_signature"),
    "query": ("query", 401, "bad_signature"),
    "body": ("body", 401, "bad_signature"),
    "nonce": ("nonce", 401, "bad_signature"),
    "device id": ("device", 401, "unknown_pairing"),
    "device id of another paired device": ("other device", 401, "bad_signature"),
    "app id": ("app", 401, "app_id_mismatch"),
    "wrong key": ("key", 401, "bad_signature"),
    "stale nonce": ("stale", 401, "nonce_expired"),
    "future nonce": ("future", 401, "nonce_from_future"),
}


@pytest.mark.parametrize("case", sorted(MATRIX))
async def test_signing_matrix_over_http(aiohttp_client: Any, tmp_path: Path, case: str) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    change, expected_status, expected_code = MATRIX[case]
    method, path, body, now = "POST", "/v1/chat/completions?stream=false", CHAT, NOW
    key = ADMIN_KEY if change == "key" else KEY
    now = NOW - 301_000 if change == "stale" else NOW + 301_000 if change == "future" else NOW
    headers = sign_request_headers(key, PEER, APP, method, path, body, now_ms=now)
    if change in SIGNED_HEADERS:
        headers = tamper(headers, change, None)
    elif change == "method":
        method = "PUT"
    elif change == "path":
        path = "/v1/completions?stream=false"
    elif change == "query":
        path = "/v1/chat/completions?stream=true"
    elif change == "body":
        body = CHAT.replace(b"hi", b"ho")
    elif change == "nonce":
        headers = tamper(headers, HEADER_NONCE, new_nonce(NOW))
    elif change == "device":
        headers = tamper(headers, HEADER_PEER_DEVICE_ID, "dv-unknown")
    elif change == "other device":
        headers = tamper(headers, HEADER_PEER_DEVICE_ID, "dv-admin")
    elif change == "app":
        headers = tamper(headers, HEADER_APP_ID, "com.evil")
    status, answer = await harness.call(method, path, body=body, headers=headers)
    assert (status, answer["error"]["code"]) == (expected_status, expected_code)


async def test_replayed_request_is_refused(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    headers = sign_request_headers(KEY, PEER, APP, "POST", "/v1/chat/completions", CHAT, now_ms=NOW)
    assert (await harness.call("POST", "/v1/chat/completions", body=CHAT, headers=headers))[0] == 200
    status, body = await harness.call("POST", "/v1/chat/completions", body=CHAT, headers=headers)
    assert (status, body["error"]["code"]) == (401, "nonce_replayed")


async def test_revoked_pairing_is_refused_at_once(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    assert (await harness.call("GET", "/v1/models", sign=True))[0] == 200
    await harness.store.revoke(PEER)
    status, body = await harness.call("GET", "/v1/models", sign=True)
    assert (status, body["error"]["code"]) == (401, "unknown_pairing")


async def test_bad_signature_is_refused_even_from_loopback(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    status, body = await harness.call("GET", "/v1/models", remote="127.0.0.1", sign=True, key=ADMIN_KEY)
    assert (status, body["error"]["code"]) == (401, "bad_signature")


@pytest.mark.parametrize("security,status", [
    (SecurityConfig(allow_anonymous_lan=True), 200),
    (SecurityConfig(), 401),
    (SecurityConfig(allow_anonymous_lan=True, require_pairing=True), 401),
])
async def test_anonymous_path_under_both_policies(aiohttp_client: Any, tmp_path: Path,
                                                  security: SecurityConfig, status: int) -> None:
    config = NodeConfig(http_bind_host="0.0.0.0", security=security)
    harness = await make_harness(aiohttp_client, tmp_path, config)
    got, body = await harness.call("GET", "/v1/models")
    assert got == status
    if status == 200:
        assert body["app"] == "anonymous" and body["auditPeer"] == "anonymous"


async def test_pairing_endpoints_are_open_to_the_lan(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    assert (await harness.call("GET", "/v1/dvai/health"))[0] == 200
    assert (await harness.call("POST", "/v1/dvai/handshake", body=b'{"peerDeviceId":"x"}'))[0] == 200


@pytest.mark.parametrize("host,status", [
    ("evil.example", 403), ("evil.example:38883", 403), ("localhost:9", 200), ("127.0.0.1:9", 200),
    ("[::1]:9", 200), ("mynode.lan:38883", 200), ("10.1.2.3:38883", 200),
])
async def test_host_header_allowlist(aiohttp_client: Any, tmp_path: Path, host: str, status: int) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    got, body = await harness.call("GET", "/v1/models", remote="127.0.0.1", headers={"Host": host})
    assert got == status
    if status == 403:
        assert body["error"]["code"] == "host_not_allowed" and body["error"]["type"] == "permission_error"


@pytest.mark.parametrize("path,method", [("/v1/dvai/audit", "GET"), ("/v1/dvai/pairings/dv-x/revoke", "POST")])
async def test_admin_endpoints(aiohttp_client: Any, tmp_path: Path, path: str, method: str) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    assert (await harness.call(method, path, remote="127.0.0.1"))[0] == 200
    assert (await harness.call(method, path, remote="::1"))[0] == 200
    status, body = await harness.call(method, path)
    assert (status, body["error"]["code"]) == (403, "loopback_only")
    status, body = await harness.call(method, path, sign=True)
    assert (status, body["error"]["code"]) == (403, "loopback_only")
    assert (await harness.call(method, path, sign=True, key=ADMIN_KEY, device="dv-admin"))[0] == 200
    status, body = await harness.call(method, path, remote="127.0.0.1",
                                      headers={"Origin": "http://evil.example"})
    assert (status, body["error"]["code"]) == (403, "browser_request_refused")
    status, _ = await harness.call(method, path, remote="127.0.0.1", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403


async def test_admin_paths_cannot_be_dodged_with_spelling(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    for path in ("/v1/dvai/%61udit", "/v1/dvai/pairings/dv%2Fx/revoke"):
        status, _ = await harness.call("GET" if "audit" in path else "POST", path)
        assert status in (403, 404), path


async def test_untrusted_loopback_behind_a_proxy(aiohttp_client: Any, tmp_path: Path) -> None:
    config = NodeConfig(http_bind_host="0.0.0.0", security=SecurityConfig(trust_loopback=False))
    harness = await make_harness(aiohttp_client, tmp_path, config)
    assert (await harness.call("GET", "/v1/models", remote="127.0.0.1"))[0] == 401
    assert (await harness.call("GET", "/v1/dvai/audit", remote="127.0.0.1"))[0] == 403
    assert (await harness.call("GET", "/v1/models", remote="127.0.0.1", sign=True))[0] == 200


async def test_signed_body_over_the_limit_is_413(aiohttp_client: Any, tmp_path: Path) -> None:
    harness = await make_harness(aiohttp_client, tmp_path)
    big = b'{"x":"' + b"a" * 8000 + b'"}'
    status, body = await harness.call("POST", "/v1/chat/completions", body=big, sign=True)
    assert (status, body["error"]["code"]) == (413, "payload_too_large")


async def test_errors_can_propagate_to_an_outer_error_middleware(aiohttp_client: Any, tmp_path: Path) -> None:
    seen: list[DVAIError] = []

    @web.middleware
    async def outer(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except DVAIError as exc:
            seen.append(exc)
            return web.json_response(exc.to_body(), status=exc.status, headers={"X-Outer": "1"})

    store = PairingStore(tmp_path / "pairings.json")
    app = build_app(NodeConfig(http_bind_host="0.0.0.0"), store, render_errors=False)
    app.middlewares.insert(0, outer)
    client = await aiohttp_client(app)
    async with client.get("/v1/models", headers={REMOTE_HEADER: LAN}) as response:
        assert response.status == 401 and response.headers["X-Outer"] == "1"
    assert seen[0].code == "signature_required"


def test_attribution_defaults_to_anonymous_without_the_middleware() -> None:
    from aiohttp.test_utils import make_mocked_request

    request = make_mocked_request("GET", "/v1/models")
    assert attribution_of(request).signed is False and audit_peer_of(request) == "anonymous"
    assert ATTRIBUTION_KEY not in request


# --------------------------------------------------------------------------
# The real thing: an exposed node in a network namespace, called over a non-loopback address


NETNS_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, tempfile
    from pathlib import Path
    import aiohttp
    from aiohttp import web
    from node.config import NodeConfig
    from node.security.guard import make_security_middleware, attribution_of
    from node.pairing.store import Pairing, PairingStore
    from node.security.signing import NonceCache, sign_request_headers

    async def main():
        store = PairingStore(Path(tempfile.mkdtemp()) / "pairings.json")
        await store.add(Pairing(peer_device_id="dv-peer", peer_device_name="p", peer_app_id="app", key=b"k" * 32,
                                via="static", paired_at=0, role="inbound"))
        app = web.Application(middlewares=[make_security_middleware(NodeConfig(http_bind_host="0.0.0.0"),
                                                                     store, NonceCache())])
        async def models(request):
            return web.json_response({"remote": request.remote, "signed": attribution_of(request).signed})
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "0.0.0.0", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        results = {}
        async with aiohttp.ClientSession() as session:
            for name, host, sign in (("loopback", "127.0.0.1", False), ("lan", "10.200.0.1", False),
                                     ("lan_signed", "10.200.0.1", True)):
                headers = sign_request_headers(b"k" * 32, "dv-peer", "app", "GET", "/v1/models", b"") if sign else {}
                async with session.get(f"http://{host}:{port}/v1/models", headers=headers) as response:
                    results[name] = [response.status, await response.json()]
        await runner.cleanup()
        print(json.dumps(results))

    asyncio.run(main())
""")


def _netns_available() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.mark.netns
@pytest.mark.skipif(not _netns_available(), reason="needs root and iproute2")
def test_exposed_node_in_a_network_namespace() -> None:
    name = f"dvai-guard-{os.getpid()}-{secrets.token_hex(3)}"
    setup = [
        ["ip", "netns", "add", name],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb"],
        ["ip", "-n", name, "addr", "add", "10.200.0.1/24", "dev", "va"],
        ["ip", "-n", name, "addr", "add", "10.200.0.2/24", "dev", "vb"],
        ["ip", "-n", name, "link", "set", "va", "up"],
        ["ip", "-n", name, "link", "set", "vb", "up"],
    ]
    try:
        for command in setup:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {done.stderr.strip()}")
        started = time.monotonic()
        done = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", NETNS_SCRIPT],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout.strip().splitlines()[-1])
        assert results["loopback"] == [200, {"remote": "127.0.0.1", "signed": False}]
        assert results["lan"][0] == 401 and results["lan"][1]["error"]["code"] == "signature_required"
        assert results["lan_signed"] == [200, {"remote": "10.200.0.1", "signed": True}]
        assert time.monotonic() - started < 30
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("path", ["/health", "/healthz", "/v1/dvai/models/smollm2-135m/unload"])
def test_health_aliases_are_public_and_model_admin_is_loopback_only(path: str) -> None:
    """The node's own lists (node/app.py): health aliases like /v1/dvai/health, load/unload like admin."""
    from node.api import mesh, trust
    from node.common.errors import PermissionDeniedError
    from node.security import DEFAULT_PUBLIC_PATHS
    from node.security.guard import AccessPolicy, decide_access
    from node.security.signing import ANONYMOUS_ATTRIBUTION

    policy = AccessPolicy(require_pairing=True, trust_loopback=True, public_paths=DEFAULT_PUBLIC_PATHS,
                          loopback_only_paths=trust.ADMIN_PATHS | mesh.ADMIN_PATHS)
    lan = {"paths": (path,), "loopback": False, "attribution": ANONYMOUS_ATTRIBUTION,
           "admin_peer": False, "browser": False}
    if "models" in path:
        with pytest.raises(PermissionDeniedError):
            decide_access(policy, **lan)  # type: ignore[arg-type]
        decide_access(policy, **{**lan, "loopback": True})  # type: ignore[arg-type]
    else:
        decide_access(policy, **lan)  # type: ignore[arg-type]  # public: no error from the LAN, unsigned
