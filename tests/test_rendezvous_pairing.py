"""QR pairing end to end: a real rendezvous on loopback and two real pairing clients."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from node.common.b64 import b64url_encode as b64encode
from node.identity import DeviceIdentity
from node.pairing.qr import PairingFailedError, parse_pairing_uri, public_bytes
from node.security.signing import compose_signed_message, sign_hmac, verify_hmac
from node.transport.rendezvous_client import (
    PairingAbortedError,
    PairingCancelledError,
    PairingExpiredError,
    PairingPrompt,
    QrPairingInitiator,
    QrPairingScanner,
    RendezvousHttpClient,
)
from rendezvous.config import RendezvousConfig
from rendezvous.server import RendezvousServer
from rendezvous.sessions import PairingSession, SessionState
from rendezvous.store import SQLiteStore

from .rendezvous_support import TamperingStore, make_config, replace_last_event_data, running

pytestmark = pytest.mark.timeout(30)


def _sides(url: str, **kwargs: object) -> tuple[QrPairingInitiator, QrPairingScanner]:
    initiator = QrPairingInitiator(
        identity=DeviceIdentity.generate(), device_name="laptop", rendezvous_url=url,
        approve=kwargs.get("approve_initiator"),  # type: ignore[arg-type]
    )
    scanner = QrPairingScanner(
        identity=DeviceIdentity.generate(), device_name="phone",
        approve=kwargs.get("approve_scanner"),  # type: ignore[arg-type]
    )
    return initiator, scanner


async def test_full_pairing_gives_both_sides_the_same_key_and_code(tmp_path: Path) -> None:
    prompts: list[PairingPrompt] = []

    async def approve(prompt: PairingPrompt) -> bool:
        prompts.append(prompt)
        return True

    async with running(make_config(tmp_path)) as server:
        initiator, scanner = _sides(server.url, approve_initiator=approve, approve_scanner=approve)
        offer = await initiator.start()
        payload = parse_pairing_uri(offer.uri)
        assert payload.rendezvous_url == server.url and len(payload.secret) * 8 >= 128
        assert offer.qr_png().startswith(b"\x89PNG")
        first, second = await asyncio.gather(initiator.wait(), scanner.pair(offer.uri))

    assert first.pairing_key == second.pairing_key and len(first.pairing_key) == 32
    assert first.short_code == second.short_code == initiator.short_code == scanner.short_code
    assert len(first.short_code) == 6 and first.short_code.isdigit()
    assert (first.peer_device_name, second.peer_device_name) == ("phone", "laptop")
    assert first.peer_device_id == scanner._identity.device_id
    assert second.peer_device_id == initiator._identity.device_id
    assert first.via == second.via == "rendezvous"
    assert sorted(p.role.value for p in prompts) == ["initiator", "scanner"]
    assert {p.short_code for p in prompts} == {first.short_code}
    # The keys work for the signed-request scheme in both directions.
    message = compose_signed_message("1700000000000.abc", "POST", "/v1/chat/completions?x=1", b'{"a":1}')
    assert verify_hmac(second.pairing_key, message, sign_hmac(first.pairing_key, message))
    assert verify_hmac(first.pairing_key, message, sign_hmac(second.pairing_key, message))


async def test_the_rendezvous_never_stores_the_secret_or_the_key(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as server:
        initiator, scanner = _sides(server.url)
        offer = await initiator.start()
        result, _ = await asyncio.gather(initiator.wait(), scanner.pair(offer.uri))
    db = await asyncio.to_thread(_database_bytes, tmp_path)
    assert offer.session_id.encode() in db, "the session is stored, so the search below means something"
    secret = parse_pairing_uri(offer.uri).secret
    for value in (secret, result.pairing_key):
        assert value not in db and b64encode(value).encode() not in db and value.hex().encode() not in db


def _database_bytes(directory: Path) -> bytes:
    return b"".join(path.read_bytes() for path in directory.glob("rendezvous.sqlite3*"))


async def test_a_session_expires(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, session_ttl=0.4)) as server:
        initiator, scanner = _sides(server.url)
        offer = await initiator.start()
        with pytest.raises(PairingExpiredError):
            await initiator.wait()
        with pytest.raises(PairingExpiredError):
            await scanner.pair(offer.uri)


async def test_a_session_is_single_use(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as server:
        initiator, scanner = _sides(server.url)
        offer = await initiator.start()
        await asyncio.gather(initiator.wait(), scanner.pair(offer.uri))
        late = QrPairingScanner(identity=DeviceIdentity.generate(), device_name="late")
        with pytest.raises(PairingFailedError, match="single-use"):
            await late.pair(offer.uri)


async def test_a_third_joiner_aborts_the_session_for_both_sides(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as server:
        initiator, _ = _sides(server.url)
        offer = await initiator.start()
        waiting = asyncio.create_task(initiator.wait())
        payload = parse_pairing_uri(offer.uri)
        client = RendezvousHttpClient(server.url)
        try:
            joined = await client.join(payload.session_id, bytes(range(32)), DeviceIdentity.generate().device_id)
            third = QrPairingScanner(identity=DeviceIdentity.generate(), device_name="intruder")
            with pytest.raises(PairingAbortedError, match="already joined"):
                await third.pair(offer.uri)
            with pytest.raises(PairingAbortedError, match="third party"):
                await waiting
            with pytest.raises(PairingAbortedError):
                await client.confirm(payload.session_id, joined["scanner_token"], "m")
        finally:
            await client.close()


async def test_declining_on_either_side_fails_both(tmp_path: Path) -> None:
    async def decline(prompt: PairingPrompt) -> bool:
        return False

    for which in ("approve_initiator", "approve_scanner"):
        async with running(make_config(tmp_path)) as server:
            initiator, scanner = _sides(server.url, **{which: decline})
            offer = await initiator.start()
            results = await asyncio.gather(initiator.wait(), scanner.pair(offer.uri), return_exceptions=True)
        assert all(isinstance(r, PairingFailedError) for r in results), results
        decliner = results[0] if which == "approve_initiator" else results[1]
        assert isinstance(decliner, PairingCancelledError)


async def test_the_host_app_can_cancel_while_waiting(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as server:
        initiator, _ = _sides(server.url)
        await initiator.start()
        waiting = asyncio.create_task(initiator.wait())
        await asyncio.sleep(0.1)
        await initiator.cancel()
        with pytest.raises(PairingCancelledError):
            await waiting


async def test_restart_mid_session_loses_nothing(tmp_path: Path) -> None:
    """The rendezvous restarts while the initiator's user looks at the short code."""
    config = make_config(tmp_path)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def slow_approve(prompt: PairingPrompt) -> bool:
        holding.set()
        await release.wait()
        return True

    server = await _start(config)
    config = server.config  # now with the bound port, so the restart listens where the QR points
    try:
        initiator, scanner = _sides(server.url, approve_initiator=slow_approve)
        offer = await initiator.start()
        both = asyncio.gather(initiator.wait(), scanner.pair(offer.uri))
        await asyncio.wait_for(holding.wait(), 5)
    finally:
        await server.stop()
    server = await _start(config)
    try:
        release.set()
        first, second = await asyncio.wait_for(both, 15)
        assert first.pairing_key == second.pairing_key
    finally:
        await server.stop()


async def _start(config: RendezvousConfig) -> RendezvousServer:
    server = RendezvousServer(config)
    await server.start()
    return server


# --------------------------------------------------------------------------
# A malicious rendezvous


def _swap_scanner_key(session: PairingSession) -> PairingSession:
    if session.state is SessionState.JOINED and session.events[-1].kind == "joined":
        return replace_last_event_data(session, scanner_public_key=b64encode(_attacker_key()))
    return session


def _swap_initiator_key(session: PairingSession) -> PairingSession:
    return dataclasses.replace(session, initiator_public_key=b64encode(_attacker_key()))


def _alter_confirmation(role: str) -> Callable[[PairingSession], PairingSession]:
    def tamper(session: PairingSession) -> PairingSession:
        last = session.events[-1]
        if last.kind == "confirm" and last.data.get("role") == role:
            message = last.data["message"]
            return replace_last_event_data(session, message=message.replace('"mac":"', '"mac":"A', 1)[:-2] + '"}')
        return session

    return tamper


def _replace_confirmation_with_attackers(session: PairingSession) -> PairingSession:
    """The relay substitutes its own identity in the scanner's confirmation (it cannot forge the MAC)."""
    last = session.events[-1]
    if last.kind == "confirm" and last.data.get("role") == "scanner":
        message = json.loads(last.data["message"])
        message["identity_key"] = b64encode(DeviceIdentity.generate().public_key)
        message["device_name"] = "attacker"
        return replace_last_event_data(session, message=json.dumps(message))
    return session


def _attacker_key() -> bytes:
    return public_bytes(X25519PrivateKey.generate())


@pytest.mark.parametrize(
    "tamper",
    [
        _swap_scanner_key,
        _swap_initiator_key,
        _alter_confirmation("scanner"),
        _alter_confirmation("initiator"),
        _replace_confirmation_with_attackers,
    ],
    ids=["swap-scanner-key", "swap-initiator-key", "alter-scanner-confirm", "alter-initiator-confirm",
         "substitute-identity"],
)
async def test_a_tampering_relay_makes_pairing_fail_on_both_sides(
    tmp_path: Path, tamper: Callable[[PairingSession], PairingSession]
) -> None:
    store = await TamperingStore.open_with(str(tmp_path / "evil.sqlite3"), tamper)
    async with running(make_config(tmp_path), store=store) as server:
        initiator, scanner = _sides(server.url)
        offer = await initiator.start()
        results = await asyncio.gather(initiator.wait(), scanner.pair(offer.uri), return_exceptions=True)
    assert all(isinstance(r, PairingFailedError) for r in results), results
    detected = ("MAC does not match", "differs from the QR code")
    assert all(any(d in str(r) for d in detected) for r in results), results


async def test_an_altered_finish_is_refused_by_the_initiator(tmp_path: Path) -> None:
    """The last message can always be altered or dropped; the side that receives it refuses."""

    def alter_finish(session: PairingSession) -> PairingSession:
        if session.events[-1].kind == "finish":
            return replace_last_event_data(session, message='{"v":1,"mac":"' + "A" * 43 + '"}')
        return session

    store = await TamperingStore.open_with(str(tmp_path / "evil.sqlite3"), alter_finish)
    async with running(make_config(tmp_path), store=store) as server:
        initiator, scanner = _sides(server.url)
        offer = await initiator.start()
        results = await asyncio.gather(initiator.wait(), scanner.pair(offer.uri), return_exceptions=True)
    assert isinstance(results[0], PairingFailedError) and "finish MAC" in str(results[0])


async def test_a_relay_in_the_middle_of_http_cannot_pair_either(tmp_path: Path) -> None:
    """A proxy between the clients and an honest rendezvous swaps the scanner's join key."""
    async with running(make_config(tmp_path)) as upstream, aiohttp.ClientSession() as http:

        async def proxy(request: web.Request) -> web.Response:
            body = await request.read()
            if request.path.endswith("/join"):
                data = json.loads(body)
                data["scanner_public_key"] = b64encode(_attacker_key())
                body = json.dumps(data).encode()
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
            async with http.request(request.method, upstream.url + request.path_qs, data=body or None,
                                    headers=headers) as response:
                answer = await response.read()
                if request.path == "/v1/sessions" and response.status == 201:
                    created = json.loads(answer)
                    created["rendezvous_url"] = f"http://127.0.0.1:{port}"  # the QR points at the proxy
                    answer = json.dumps(created).encode()
                return web.Response(status=response.status, body=answer, content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            initiator, scanner = _sides(f"http://127.0.0.1:{port}")
            offer = await initiator.start()
            results = await asyncio.gather(initiator.wait(), scanner.pair(offer.uri), return_exceptions=True)
        finally:
            await runner.cleanup()
    assert all(isinstance(r, PairingFailedError) for r in results), results


async def test_sqlite_store_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    store = await SQLiteStore.open(path)
    await store.register_device("dv" + "a" * 32, "key", 1.0)
    await store.close()
    store = await SQLiteStore.open(path)
    try:
        device = await store.get_device("dv" + "a" * 32)
        assert device is not None and device.public_key == "key"
        assert await store.count_devices() == 1
    finally:
        await store.close()
