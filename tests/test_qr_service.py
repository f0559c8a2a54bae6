"""QrPairingService: the node component behind pair-qr / pair-scan, against a real rendezvous."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node.common.errors import ConflictError, InvalidRequestError, NotFoundError
from node.identity import DeviceIdentity
from node.pairing.qr import PairingFailedError, PairingResult
from node.pairing.qr_service import QrPairingService, offer_to_json, result_to_json

from .rendezvous_support import TamperingStore, make_config, replace_last_event_data, running

pytestmark = pytest.mark.timeout(30)


def _service(url: str | None, stored: list[PairingResult], name: str) -> QrPairingService:
    async def store(result: PairingResult) -> None:
        stored.append(result)

    return QrPairingService(
        identity=DeviceIdentity.generate(), device_name=name, rendezvous_url=url, store_result=store
    )


async def test_offer_then_scan_stores_the_same_key_on_both_nodes(tmp_path: Path) -> None:
    shown: list[PairingResult] = []
    scanned: list[PairingResult] = []
    async with running(make_config(tmp_path)) as server:
        laptop, phone = _service(server.url, shown, "laptop"), _service(None, scanned, "phone")
        offer, _ = await laptop.offer()
        body = offer_to_json(offer, rendezvous_url=server.url)
        assert body["payload"].startswith("dvai://pair?") and body["qr"]["svg"].lstrip().startswith("<svg")
        assert laptop.status(offer.session_id).state == "waiting"
        result = await phone.scan(body["payload"])
        status = await laptop.wait(offer.session_id)
        await laptop.close()
        await phone.close()
    assert status.state == "paired" and status.short_code == result.short_code
    assert [r.pairing_key for r in shown] == [r.pairing_key for r in scanned] == [result.pairing_key]
    assert result_to_json(result)["via"] == "rendezvous" and "pairingKey" not in result_to_json(result)
    assert status.to_json()["peerDeviceName"] == "phone"


async def test_nothing_is_stored_when_the_relay_tampers(tmp_path: Path) -> None:
    def tamper(session):  # type: ignore[no-untyped-def]
        last = session.events[-1]
        if last.kind == "confirm" and last.data.get("role") == "initiator":
            return replace_last_event_data(session, message=last.data["message"].replace('"mac":"', '"mac":"B', 1))
        return session

    shown: list[PairingResult] = []
    scanned: list[PairingResult] = []
    store = await TamperingStore.open_with(str(tmp_path / "evil.sqlite3"), tamper)
    async with running(make_config(tmp_path), store=store) as server:
        laptop, phone = _service(server.url, shown, "laptop"), _service(None, scanned, "phone")
        offer, _ = await laptop.offer()
        with pytest.raises(PairingFailedError):
            await phone.scan(offer.uri)
        status = await laptop.wait(offer.session_id)
        await laptop.close()
    assert status.state == "failed"
    assert shown == [] and scanned == []


async def test_cancel_close_and_refusals(tmp_path: Path) -> None:
    stored: list[PairingResult] = []
    with pytest.raises(ConflictError, match="no rendezvous"):
        await _service(None, stored, "x").offer()
    with pytest.raises(InvalidRequestError):
        await _service(None, stored, "x").scan("https://not-a-payload")
    async with running(make_config(tmp_path)) as server:
        service = _service(server.url, stored, "laptop")
        first, _ = await service.offer()
        assert (await service.cancel(first.session_id)).state == "cancelled"
        offers = [await service.offer() for _ in range(4)]
        with pytest.raises(ConflictError, match="already waiting"):
            await service.offer()
        with pytest.raises(NotFoundError):
            service.status("nope")
        await asyncio.wait_for(service.close(), 5)
        assert {service.status(o.session_id).state for o, _ in offers} == {"cancelled"}
    assert stored == []
