"""ICE server selection: aiortc contacts one STUN and one TURN server per link set-up, so
set-ups take the configured ones in turn (``node.transport.ice``), the next after a failure."""

from __future__ import annotations

import asyncio
import logging

import pytest

from node.config import IceServer
from node.transport.ice import plan_ice_servers, select_ice_servers
from node.transport.links import LinkManager, LinkUnavailableError
from node.transport.webrtc import RtcLink

pytestmark = pytest.mark.timeout(30)

STUN = IceServer(urls=("stun:stun1.example:3478", "stun:stun2.example"))
TURN_UDP = IceServer(urls=("turn:turn1.example:3478?transport=udp",), username="u1", credential="p1")
TURN_TCP = IceServer(urls=("turns:turn2.example:5349",), username="u2", credential="p2")


def test_every_usable_url_is_planned_one_per_entry_in_order() -> None:
    plan = plan_ice_servers((STUN, TURN_UDP, TURN_TCP))
    assert [s.urls for s in plan.stun] == [("stun:stun1.example:3478",), ("stun:stun2.example",)]
    assert [(s.urls, s.username, s.credential) for s in plan.turn] == [
        (("turn:turn1.example:3478?transport=udp",), "u1", "p1"), (("turns:turn2.example:5349",), "u2", "p2")]
    assert plan.unusable == () and plan.rotates


def test_urls_aiortc_would_skip_are_named_with_the_reason() -> None:
    plan = plan_ice_servers((
        IceServer(urls=("stuns:s.example", "stun:s.example?transport=udp")),
        IceServer(urls=("turn:t.example?transport=tls", "turns:t.example?transport=udp"), username="u",
                  credential="p"),
        IceServer(urls=("turn:t.example",)),  # no credentials
    ))
    assert plan.stun == () and plan.turn == () and not plan.rotates
    assert len(plan.unusable) == 5
    assert "stuns:" in plan.unusable[0] and "credential" in plan.unusable[4]


def test_set_ups_take_the_servers_in_turn() -> None:
    plan = plan_ice_servers((STUN, TURN_UDP, TURN_TCP, IceServer(urls=("stun:stun3.example",))))
    picks = [tuple(s.urls[0].split(":")[1] for s in select_ice_servers(plan, n)) for n in range(4)]
    assert picks == [("stun1.example", "turn1.example"), ("stun2.example", "turn2.example"),
                     ("stun3.example", "turn1.example"), ("stun1.example", "turn2.example")]
    assert select_ice_servers(plan_ice_servers(()), 3) == ()  # none configured: host candidates only


class _Silent:
    """A rendezvous that accepts offers and never brings an answer."""

    async def send(self, to: str, data: str, *, message_id: str | None = None) -> None:
        return None


async def test_a_failed_set_up_moves_to_the_next_servers_and_the_limit_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    # unreachable servers on loopback: nothing leaves the machine
    servers = (IceServer(urls=("stun:127.0.0.1:9", "stun:127.0.0.1:10")),
               IceServer(urls=("turn:127.0.0.1:11",), username="u", credential="p"),
               IceServer(urls=("turns:127.0.0.1:12",), username="u", credential="p"))
    manager = LinkManager(device_id="a" * 52, pairing_key_for=lambda _peer: b"k" * 32, ice_servers=lambda: servers,
                          connect_timeout=0.2)
    await manager.start()
    manager.attach_signaling(_Silent())
    used: list[list[str]] = []
    new_link = manager._new_link  # noqa: SLF001 - watch which servers each set-up gets

    def watched(peer_id: str, link_id: str, *, offerer: bool) -> RtcLink:
        link = new_link(peer_id, link_id, offerer=offerer)
        used.append([s.urls[0] for s in link.ice_servers])
        return link

    manager._new_link = watched  # type: ignore[method-assign]  # noqa: SLF001
    try:
        with caplog.at_level(logging.WARNING, logger="node.transport.links"):
            for _ in range(3):
                with pytest.raises(LinkUnavailableError):
                    await manager.connect("b" * 52, 0.3)  # never answered, or the servers are unreachable
                await asyncio.sleep(0.05)
    finally:
        await manager.stop()
    assert used == [["stun:127.0.0.1:9", "turn:127.0.0.1:11"], ["stun:127.0.0.1:10", "turns:127.0.0.1:12"],
                    ["stun:127.0.0.1:9", "turn:127.0.0.1:11"]]
    warnings = [r.getMessage() for r in caplog.records if "aiortc contacts one STUN" in r.getMessage()]
    assert len(warnings) == 1 and "2 STUN and 2 TURN" in warnings[0]  # once per configuration
