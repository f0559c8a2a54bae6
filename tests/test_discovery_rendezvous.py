"""Rendezvous peers in the peer table: listed from presence and health over the link,
and a peer reachable both on the LAN and through the rendezvous uses the LAN."""

from __future__ import annotations

import asyncio

from node.discovery.model import HealthReport, Peer, PeerClaim, PeerState
from node.discovery.peers import PeerChangeKind, PeerTable
from node.discovery.rendezvous import REMOTE_HEALTH_REFRESH_S, RemotePeerBook

A = "dv" + "a" * 32
B = "dv" + "b" * 32
NOW = 1_800_000_000_000


def report(device_id: str, *, proven: bool = True) -> HealthReport:
    return HealthReport(device_id=device_id, status="ok", device_name="far", loaded_models=("m",), proven=proven)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def book_for(table: PeerTable, answers: dict[str, HealthReport | str], clock: Clock,
             link_up: bool = False) -> tuple[RemotePeerBook, list[str]]:
    asked: list[str] = []

    async def fetch(device_id: str) -> HealthReport | str:
        asked.append(device_id)
        return answers[device_id]

    book = RemotePeerBook(table=table, fetch_health=fetch, paired_name={A: "paired-a", B: "paired-b"}.get,
                          link_up=lambda _id: link_up, clock=clock, now_ms=lambda: NOW)
    return book, asked


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_online_paired_peers_become_reachable_rendezvous_peers() -> None:
    table = PeerTable(now=lambda: NOW)
    changes = []
    table.subscribe(changes.append)
    clock = Clock()
    book, asked = book_for(table, {A: report(A), B: "link failed"}, clock)
    book.on_presence(frozenset({A, B, "dv" + "c" * 32}))  # c is online but not paired with us: ignored
    await settle()
    a, b = table.get(A), table.get(B)
    assert a is not None and a.via == "rendezvous" and a.state is PeerState.REACHABLE and a.identity_verified
    assert a.loaded_models == ("m",) and a.device_name == "far"
    assert b is not None and b.state is PeerState.UNREACHABLE and not b.identity_verified
    assert len(table.snapshot()) == 2 and sorted(asked) == [A, B]
    book.on_presence(frozenset({A}))
    assert table.get(B) is None and [c.kind for c in changes].count(PeerChangeKind.REMOVED) == 1
    await book.close()
    assert table.get(A) is None


async def test_health_is_renewed_only_while_a_link_is_up_or_when_old() -> None:
    table = PeerTable(now=lambda: NOW)
    clock = Clock()
    book, asked = book_for(table, {A: report(A)}, clock)
    book.on_presence(frozenset({A}))
    await settle()
    clock.t += REMOTE_HEALTH_REFRESH_S + 1
    book.on_presence(frozenset({A}))  # no link up: an idle pair keeps no link open
    await settle()
    assert asked == [A]
    up, asked_up = book_for(table, {A: report(A)}, clock, link_up=True)
    up.on_presence(frozenset({A}))
    await settle()
    clock.t += REMOTE_HEALTH_REFRESH_S + 1
    up.on_presence(frozenset({A}))
    await settle()
    assert asked_up == [A, A]


async def test_an_answer_for_another_device_or_unproven_is_not_trusted() -> None:
    table = PeerTable(now=lambda: NOW)
    book, _ = book_for(table, {A: report(B), B: report(B, proven=False)}, Clock())
    book.on_presence(frozenset({A, B}))
    await settle()
    assert table.get(A).state is PeerState.UNREACHABLE  # type: ignore[union-attr]
    assert table.get(B).identity_verified is False  # type: ignore[union-attr]


async def test_lan_is_preferred_when_a_peer_is_reachable_both_ways() -> None:
    table = PeerTable(now=lambda: NOW)
    book, _ = book_for(table, {A: report(A)}, Clock())
    book.on_presence(frozenset({A}))
    await settle()
    table.observe(PeerClaim(device_id=A, base_url="http://192.168.1.5:38883", source="mdns"))
    # LAN entry pending (no health answer yet): the reachable rendezvous entry is used
    assert table.get(A).via == "rendezvous"  # type: ignore[union-attr]
    table.health_ok(A, "http://192.168.1.5:38883", report(A))
    peer = table.get(A)
    assert peer is not None and peer.via == "mdns" and peer.base_url == "http://192.168.1.5:38883"
    assert [p.via for p in table.snapshot()] == ["mdns"]  # listed once
    assert table.remote(A) is not None  # the rendezvous entry is still there for when the LAN goes


def test_self_is_never_a_remote_peer() -> None:
    table = PeerTable(self_device_id=A, now=lambda: NOW)
    table.set_remote([Peer(device_id=A, device_name="me", dvai_version="", base_url="", app_id=None,
                           loaded_models=(), capability={}, via="rendezvous", secure=True, last_seen_at=NOW)])
    assert table.get(A) is None and table.snapshot() == ()


def test_cli_shows_the_link_state_and_round_trip() -> None:
    from node.cli.admin import link_text

    assert link_text({"state": "direct", "rttMs": 23.4, "error": None}) == "direct 23 ms"
    assert link_text({"state": "relayed", "rttMs": None}) == "relayed"
    assert link_text({"state": "failed", "rttMs": 5.0, "error": "ping timeout"}) == "failed"
    assert link_text(None) == "-"
