"""The rendezvous HTTP surface under hostile input: clean JSON 4xx/429, never a 500."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.common.b64 import b64url_encode as b64encode
from node.identity import DeviceIdentity

from .rendezvous_support import make_config, request, running

pytestmark = pytest.mark.timeout(30)

KEY = b64encode(bytes(range(1, 33)))
DEVICE = DeviceIdentity.generate().device_id


def _assert_json_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    assert isinstance(body, dict) and isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_create_join_events_shapes(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as server, aiohttp.ClientSession() as http:
        status, _, created = await request(http, "POST", f"{server.url}/v1/sessions", json={"initiator_public_key": KEY})
        assert status == 201
        assert set(created) == {"session_id", "initiator_token", "expires_at", "ttl_seconds", "rendezvous_url"}
        assert created["rendezvous_url"] == server.url and created["ttl_seconds"] == 120
        sid, itok = created["session_id"], created["initiator_token"]
        waiter = asyncio.create_task(
            request(http, "GET", f"{server.url}/v1/sessions/{sid}/events?after=1&wait=10", token=itok)
        )
        await asyncio.sleep(0.1)
        assert not waiter.done(), "the initiator waits on a long-poll, it does not spin"
        status, _, joined = await request(
            http, "POST", f"{server.url}/v1/sessions/{sid}/join",
            json={"scanner_public_key": KEY, "scanner_device_id": DEVICE},
        )
        assert status == 200 and joined["initiator_public_key"] == KEY and joined["state"] == "joined"
        status, _, page = await asyncio.wait_for(waiter, 2)
        assert status == 200 and page["state"] == "joined" and page["role"] == "initiator"
        assert [e["kind"] for e in page["events"]] == ["joined"]
        assert page["events"][0]["data"] == {"scanner_public_key": KEY, "scanner_device_id": DEVICE}
        status, _, page = await request(http, "GET", f"{server.url}/v1/sessions/{sid}/events", token=joined["scanner_token"])
        assert page["role"] == "scanner" and page["last_seq"] == 2


async def test_hostile_input_gets_clean_4xx(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as server, aiohttp.ClientSession() as http:
        url = server.url
        _, _, created = await request(http, "POST", f"{url}/v1/sessions", json={"initiator_public_key": KEY})
        sid, token = created["session_id"], created["initiator_token"]
        cases: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", "/v1/sessions", {"data": b"{not json"}, 400),
            ("POST", "/v1/sessions", {"data": b"[1,2]"}, 400),
            ("POST", "/v1/sessions", {"data": b"[" * 100_000 + b"]" * 100_000}, 413),
            ("POST", "/v1/sessions", {"data": b"[" * 5000 + b"]" * 5000}, 400),
            ("POST", "/v1/sessions", {"json": {"initiator_public_key": 12}}, 400),
            ("POST", "/v1/sessions", {"json": {"initiator_public_key": "short"}}, 400),
            ("POST", "/v1/sessions", {"json": {}}, 400),
            ("POST", "/v1/sessions", {"data": b"x" * 20_000}, 413),
            ("POST", "/v1/sessions", {"data": b"\xff\xfe\x00"}, 400),
            ("POST", f"/v1/sessions/{sid}/join", {"json": {"scanner_public_key": KEY}}, 400),
            ("POST", f"/v1/sessions/{sid}/join", {"json": {"scanner_public_key": KEY, "scanner_device_id": "x"}}, 400),
            ("POST", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/join",
             {"json": {"scanner_public_key": KEY, "scanner_device_id": DEVICE}}, 404),
            ("POST", "/v1/sessions/../../etc/join", {"json": {}}, 404),
            ("POST", "/v1/sessions/%00%01/join",
             {"json": {"scanner_public_key": KEY, "scanner_device_id": DEVICE}}, 404),
            ("GET", f"/v1/sessions/{sid}/events", {}, 401),
            ("GET", f"/v1/sessions/{sid}/events", {"headers": {"Authorization": "Bearer nope"}}, 401),
            ("GET", f"/v1/sessions/{sid}/events?after=x", {"headers": {"Authorization": f"Bearer {token}"}}, 400),
            ("GET", f"/v1/sessions/{sid}/events?after=-1", {"headers": {"Authorization": f"Bearer {token}"}}, 400),
            ("GET", f"/v1/sessions/{sid}/events?wait=nan", {"headers": {"Authorization": f"Bearer {token}"}}, 400),
            ("POST", f"/v1/sessions/{sid}/confirm", {"json": {"message": "m"}}, 401),
            ("POST", f"/v1/sessions/{sid}/confirm",
             {"json": {"message": "m"}, "headers": {"Authorization": f"Bearer {token}"}}, 409),
            ("POST", f"/v1/sessions/{sid}/confirm",
             {"json": {"message": 5}, "headers": {"Authorization": f"Bearer {token}"}}, 400),
            ("POST", f"/v1/sessions/{sid}/confirm",
             {"json": {"message": "m" * 5000}, "headers": {"Authorization": f"Bearer {token}"}}, 413),
            ("POST", f"/v1/sessions/{sid}/finish",
             {"json": {"message": "m"}, "headers": {"Authorization": f"Bearer {token}"}}, 409),
            ("POST", f"/v1/sessions/{sid}/abort",
             {"json": {"reason": ["x"]}, "headers": {"Authorization": f"Bearer {token}"}}, 400),
            ("GET", "/v1/sessions", {}, 405),
            ("GET", "/nowhere", {}, 404),
            ("GET", "/v1/ws", {}, 400),
        ]
        for method, path, kwargs, expected in cases:
            status, _, body = await request(http, method, url + path, **kwargs)
            _assert_json_error(status, body, expected)
        status, _, health = await request(http, "GET", f"{url}/healthz")
        assert status == 200 and health["status"] == "ok"


async def test_abort_is_idempotent_and_ends_the_session(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as server, aiohttp.ClientSession() as http:
        _, _, created = await request(http, "POST", f"{server.url}/v1/sessions", json={"initiator_public_key": KEY})
        abort = f"{server.url}/v1/sessions/{created['session_id']}/abort"
        for _ in range(2):
            status, _, body = await request(http, "POST", abort, token=created["initiator_token"])
            assert status == 200 and body["state"] == "aborted"
        status, _, body = await request(
            http, "POST", f"{server.url}/v1/sessions/{created['session_id']}/join",
            json={"scanner_public_key": KEY, "scanner_device_id": DEVICE},
        )
        _assert_json_error(status, body, 409)
        assert body["error"]["code"] == "session_aborted"


async def test_rate_limits_answer_429_with_retry_after(tmp_path: Path) -> None:
    config = make_config(tmp_path, create_per_minute=3, join_per_minute=2, requests_per_minute=40)
    async with running(config) as server, aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(5):
            status, headers, body = await request(http, "POST", f"{server.url}/v1/sessions",
                                                  json={"initiator_public_key": KEY})
            statuses.append(status)
        assert statuses == [201, 201, 201, 429, 429]
        _assert_json_error(status, body, 429)
        assert int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "rate_limit_error"
        join = f"{server.url}/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/join"
        statuses = [
            (await request(http, "POST", join, json={"scanner_public_key": KEY, "scanner_device_id": DEVICE}))[0]
            for _ in range(3)
        ]
        assert statuses == [404, 404, 429]
        # A flood of anything: clean 429s (and the service stays up), never a 500.
        flood = f"{server.url}/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/events"
        results = await asyncio.gather(*(request(http, "GET", flood) for _ in range(60)))
        codes = {status for status, _, _ in results}
        assert codes == {404, 429}
        assert (await request(http, "GET", f"{server.url}/healthz"))[0] == 200, "monitoring is never rate-limited"
        metrics = await (await http.get(f"{server.url}/metrics")).text()
    assert 'dvai_rendezvous_rate_limited_total{rule="create"} 2.0' in metrics
    assert "dvai_rendezvous_sessions_created_total 3.0" in metrics


async def test_forwarded_for_is_used_only_when_trusted(tmp_path: Path) -> None:
    for trusted, expected in ((True, [201, 201, 201]), (False, [201, 429, 429])):
        config = make_config(tmp_path, create_per_minute=1, trust_forwarded_for=trusted)
        async with running(config) as server, aiohttp.ClientSession() as http:
            statuses = []
            for i in range(3):
                status, _, _ = await request(
                    http, "POST", f"{server.url}/v1/sessions", json={"initiator_public_key": KEY},
                    headers={"X-Forwarded-For": f"198.51.100.{i}"},
                )
                statuses.append(status)
        assert statuses == expected


async def test_session_cap_answers_503(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, max_sessions=2)) as server, aiohttp.ClientSession() as http:
        statuses = [
            (await request(http, "POST", f"{server.url}/v1/sessions", json={"initiator_public_key": KEY}))[0:2]
            for _ in range(3)
        ]
    assert [s for s, _ in statuses] == [201, 201, 503]
    assert "Retry-After" in statuses[2][1]


async def test_sweeper_removes_ended_sessions(tmp_path: Path) -> None:
    config = make_config(tmp_path, session_ttl=0.2, session_retention=0.1, sweep_interval=0.1)
    async with running(config) as server, aiohttp.ClientSession() as http:
        _, _, created = await request(http, "POST", f"{server.url}/v1/sessions", json={"initiator_public_key": KEY})
        events = f"{server.url}/v1/sessions/{created['session_id']}/events"
        status, _, page = await request(http, "GET", events + "?after=1&wait=5", token=created["initiator_token"])
        assert status == 200 and page["state"] == "expired"
        await asyncio.sleep(0.5)
        status, _, body = await request(http, "GET", events, token=created["initiator_token"])
        _assert_json_error(status, body, 404)


async def test_tls_with_a_certificate_file(tmp_path: Path) -> None:
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    config = make_config(tmp_path, tls_cert=cert_file, tls_key=key_file)
    client_context = ssl.create_default_context(cafile=str(cert_file))
    async with running(config) as server:
        assert server.url.startswith("https://")
        url = server.url.replace("127.0.0.1", "localhost")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as http:
            status, _, body = await request(http, "GET", f"{url}/healthz")
    assert status == 200 and body["status"] == "ok"
