"""PeerTable and its merge rules, with plain data and an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from node.discovery.merge import MergeOutcome, apply_claim, apply_health_ok, apply_timeouts
from node.discovery.peers import (
    HealthReport,
    PeerChange,
    PeerChangeKind,
    PeerClaim,
    PeerState,
    PeerTable,
)
from node.identity import DeviceIdentity

A = DeviceIdentity.generate().device_id
B = DeviceIdentity.generate().device_id
SELF = DeviceIdentity.generate().device_id
URL_A = "http://10.0.0.1:38883/v1"
URL_A2 = "http://10.0.0.1:40000/v1"
URL_VPN = "http://100.64.0.1:38883/v1"
URL_EVIL = "http://10.0.0.66:38883/v1"


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


def claim(device_id: str = A, url: str = URL_A, source: str = "mdns", **kw: object) -> PeerClaim:
    return PeerClaim(device_id=device_id, base_url=url, source=source, **kw)  # type: ignore[arg-type]


def report(device_id: str = A, *, instance: str | None = "i1", proven: bool = False, **kw: object) -> HealthReport:
    return HealthReport(device_id=device_id, status="ok", instance_id=instance, proven=proven, **kw)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> PeerTable:
    return PeerTable(self_device_id=SELF, now=clock, unreachable_after=3.0, remove_after=60.0)


def test_first_claim_adds_a_pending_peer(table: PeerTable, clock: Clock) -> None:
    outcome = table.observe(claim(device_name="desk", loaded_models=("m1",), capability={"m1": 30.0}))
    assert outcome is MergeOutcome.ADDED
    peer = table.get(A)
    assert peer is not None
    assert (peer.state, peer.via, peer.base_url, peer.address) == (
        PeerState.PENDING, "mdns", URL_A, "10.0.0.1:38883")
    assert peer.loaded_models == ("m1",) and peer.capability == {"m1": 30.0}
    assert peer.last_seen_at == clock.ms


def test_same_device_from_mdns_and_static_is_one_entry(table: PeerTable) -> None:
    table.observe(claim(source="mdns", device_name="from-mdns"))
    table.observe(claim(source="static", device_name="from-config"))
    assert len(table) == 1
    peer = table.get(A)
    assert peer is not None
    assert peer.sources == ("mdns", "static") and peer.via == "mdns"
    assert peer.device_name == "from-config"  # an operator-given name beats the announced one


def test_health_answer_makes_reachable_and_refreshes_models(table: PeerTable) -> None:
    table.observe(claim(loaded_models=("old",), queue_depth={"old": 9}))
    outcome = table.health_ok(A, URL_A, report(loaded_models=("new",), queue_depth={"new": 2},
                                               device_name="desk", proven=True))
    assert outcome is MergeOutcome.UPDATED
    peer = table.get(A)
    assert peer is not None
    assert peer.state is PeerState.REACHABLE and peer.identity_verified
    assert peer.loaded_models == ("new",) and peer.queue_depth == {"new": 2}


def test_silent_peer_goes_unreachable_then_is_removed_and_recovers(table: PeerTable, clock: Clock) -> None:
    table.observe(claim())
    table.health_ok(A, URL_A, report())
    clock.advance(2.9)
    table.sweep()
    assert table.get(A).state is PeerState.REACHABLE  # type: ignore[union-attr]
    clock.advance(0.2)
    table.sweep()
    assert table.get(A).state is PeerState.UNREACHABLE  # type: ignore[union-attr]
    table.health_ok(A, URL_A, report())
    assert table.get(A).state is PeerState.REACHABLE  # type: ignore[union-attr]
    clock.advance(61)
    table.sweep()
    assert A not in table


def test_never_answering_peer_goes_unreachable(table: PeerTable, clock: Clock) -> None:
    table.observe(claim())
    table.health_failed(A, URL_A)
    clock.advance(3)
    table.sweep()
    assert table.get(A).state is PeerState.UNREACHABLE  # type: ignore[union-attr]


def test_goodbye_removes_at_once_unless_another_source_reports_it(table: PeerTable) -> None:
    table.observe(claim(A))
    table.observe(claim(B, URL_VPN))
    table.observe(claim(B, URL_VPN, source="static"))
    assert table.withdraw(A, "mdns") is True
    assert A not in table
    assert table.withdraw(B, "mdns") is False
    peer = table.get(B)
    assert peer is not None and peer.via == "static" and peer.sources == ("static",)


def test_claims_about_this_node_are_not_listed(table: PeerTable) -> None:
    assert table.observe(claim(SELF)) is MergeOutcome.SELF
    assert len(table) == 0


def test_address_answering_as_another_device_is_flagged(table: PeerTable) -> None:
    table.observe(claim(A))
    assert table.health_ok(A, URL_A, report(B)) is MergeOutcome.MISMATCH
    peer = table.get(A)
    assert peer is not None and peer.state is PeerState.FLAGGED and B in (peer.flag or "")
    table.health_ok(A, URL_A, report(A))
    assert table.get(A).state is PeerState.REACHABLE  # type: ignore[union-attr]


def test_unproven_impostor_cannot_take_over_a_proven_peer(table: PeerTable) -> None:
    table.observe(claim(A))
    table.health_ok(A, URL_A, report(proven=True))
    assert table.observe(claim(A, URL_EVIL)) is MergeOutcome.CANDIDATE
    assert table.get(A).base_url == URL_A  # type: ignore[union-attr]
    outcome = table.health_ok(A, URL_EVIL, report(instance="evil", proven=False))
    assert outcome is MergeOutcome.HIJACK_REJECTED
    entry = table.entry(A)
    assert entry is not None and entry.base_url == URL_A and entry.candidate is None
    # Even when the real device then goes quiet, the impostor has to come back and win again.
    table.health_failed(A, URL_A)
    assert table.get(A).base_url == URL_A  # type: ignore[union-attr]


def test_first_come_holds_against_a_live_duplicate(table: PeerTable, clock: Clock) -> None:
    table.observe(claim(A))
    table.health_ok(A, URL_A, report(instance="i1"))
    clock.advance(0.1)
    table.observe(claim(A, URL_EVIL))
    clock.advance(0.01)
    assert table.health_ok(A, URL_EVIL, report(instance="i2")) is MergeOutcome.UNCHANGED  # undecided
    clock.advance(0.01)
    outcome = table.health_ok(A, URL_A, report(instance="i1"))
    assert outcome is MergeOutcome.DUPLICATE
    assert table.get(A).base_url == URL_A  # type: ignore[union-attr]


def test_restart_on_a_new_port_moves_the_peer(table: PeerTable, clock: Clock) -> None:
    table.observe(claim(A))
    table.health_ok(A, URL_A, report(instance="i1", proven=True))
    clock.advance(5)  # crashed a while ago, but not yet swept
    table.observe(claim(A, URL_A2))
    clock.advance(0.01)
    table.health_ok(A, URL_A2, report(instance="i2", proven=True))
    assert table.get(A).base_url == URL_A  # type: ignore[union-attr]  # undecided until the old one is checked
    clock.advance(0.01)
    assert table.health_failed(A, URL_A) is MergeOutcome.SWITCHED
    peer = table.get(A)
    assert peer is not None and peer.base_url == URL_A2 and peer.state is PeerState.REACHABLE


def test_proven_candidate_beats_unproven_anchor(table: PeerTable) -> None:
    table.observe(claim(A, URL_EVIL))
    table.health_ok(A, URL_EVIL, report(instance="evil"))
    table.observe(claim(A, URL_A))
    assert table.health_ok(A, URL_A, report(instance="real", proven=True)) is MergeOutcome.SWITCHED
    assert table.get(A).base_url == URL_A  # type: ignore[union-attr]


def test_same_process_at_another_address_is_an_alternate_used_for_failover(table: PeerTable) -> None:
    table.observe(claim(A, URL_A))
    table.health_ok(A, URL_A, report(instance="i1"))
    table.observe(claim(A, URL_VPN, source="static"))
    assert table.health_ok(A, URL_VPN, report(instance="i1")) is MergeOutcome.ALTERNATE
    entry = table.entry(A)
    assert entry is not None and entry.alternates == (URL_VPN,)
    assert table.get(A).sources == ("mdns", "static")  # type: ignore[union-attr]
    table.health_failed(A, URL_A)
    assert table.get(A).base_url == URL_VPN  # type: ignore[union-attr]


def test_unconfirmed_flood_cannot_push_out_confirmed_peers(clock: Clock) -> None:
    table = PeerTable(now=clock, max_peers=8, max_pending=3)
    confirmed = [DeviceIdentity.generate().device_id for _ in range(4)]
    for index, device_id in enumerate(confirmed):
        url = f"http://10.0.1.{index}:1/v1"
        table.observe(claim(device_id, url))
        table.health_ok(device_id, url, report(device_id))
    for index in range(200):
        clock.advance(0.001)
        table.observe(claim(DeviceIdentity.generate().device_id, f"http://10.9.0.{index % 250}:1/v1"))
    assert len(table) <= 8
    assert all(device_id in table for device_id in confirmed)
    assert sum(1 for p in table.snapshot() if p.state is PeerState.PENDING) <= 3


def test_full_table_of_reachable_peers_refuses_new_ones(clock: Clock) -> None:
    table = PeerTable(now=clock, max_peers=2, max_pending=2)
    for device_id, url in ((A, URL_A), (B, URL_VPN)):
        table.observe(claim(device_id, url))
        table.health_ok(device_id, url, report(device_id))
    assert table.observe(claim(DeviceIdentity.generate().device_id, URL_EVIL)) is MergeOutcome.TABLE_FULL
    assert len(table) == 2


def test_peer_json_uses_the_reference_field_names(table: PeerTable) -> None:
    table.observe(claim(device_name="desk", dvai_version="0.1.0", app_id="com.acme",
                        loaded_models=("m",), capability={"m": 12.5}))
    body = table.get(A).to_json()  # type: ignore[union-attr]
    for key in ("deviceId", "deviceName", "dvaiVersion", "baseUrl", "appId", "loadedModels",
                "capability", "via", "secure", "lastSeenAt"):
        assert key in body
    assert body["deviceId"] == A and body["baseUrl"] == URL_A and body["secure"] is False
    assert body["state"] == "pending" and body["appId"] == "com.acme"


def test_changes_are_notified_but_not_bare_last_seen_updates(table: PeerTable, clock: Clock) -> None:
    changes: list[PeerChange] = []
    unsubscribe = table.subscribe(changes.append)
    table.observe(claim())
    table.health_ok(A, URL_A, report())
    clock.advance(1)
    table.health_ok(A, URL_A, report())  # only lastSeenAt moves
    table.remove(A)
    assert [c.kind for c in changes] == [PeerChangeKind.ADDED, PeerChangeKind.UPDATED, PeerChangeKind.REMOVED]
    unsubscribe()
    table.observe(claim())
    assert len(changes) == 3


def test_a_broken_listener_does_not_break_the_table(table: PeerTable) -> None:
    def broken(_change: PeerChange) -> None:
        raise RuntimeError("boom")

    table.subscribe(broken)
    table.observe(claim())
    assert A in table


async def test_wait_for_and_watch(table: PeerTable) -> None:
    async with table.watch() as changes:
        asyncio.get_running_loop().call_later(0.01, table.observe, claim())
        assert await table.wait_for(lambda t: A in t, within=1.0)
        first = await anext(changes)
        assert first.kind is PeerChangeKind.ADDED and first.peer.device_id == A
    assert not await table.wait_for(lambda t: B in t, within=0.01)


def test_watch_queue_is_bounded(table: PeerTable) -> None:
    watch = table.watch(max_queue=3)
    for index in range(10):
        table.observe(claim(DeviceIdentity.generate().device_id, f"http://10.0.0.{index}:1/v1"))
    assert len(watch._queue) == 3
    watch.close()


def test_pure_rules_work_on_plain_values() -> None:
    entry, outcome = apply_claim(None, claim(), 0)
    assert outcome is MergeOutcome.ADDED
    entry, outcome = apply_health_ok(entry, URL_A, report(), 10, max_alternates=2)
    assert entry.state is PeerState.REACHABLE and entry.last_ok_at == 10
    assert apply_timeouts(entry, 3009, unreachable_after_ms=3000, remove_after_ms=9000) == entry
    later = apply_timeouts(entry, 3010, unreachable_after_ms=3000, remove_after_ms=9000)
    assert later is not None and later.state is PeerState.UNREACHABLE
    assert apply_timeouts(later, 9010, unreachable_after_ms=3000, remove_after_ms=9000) is None
