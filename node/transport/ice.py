"""Which ICE servers one link set-up uses: aiortc (through aioice) contacts at most one STUN
and one TURN server per peer connection. It takes the first usable STUN URL and the first
usable TURN URL of the configuration and silently skips the rest, and skips URLs it cannot
use at all (``stuns:``, ``turn:`` over anything but UDP or TCP, ``turns:`` over anything
but TCP, TURN without a username and password).

So that every configured server is still used, a link set-up takes one STUN and one TURN
URL by *attempt*: attempt ``n`` uses the ``n``-th usable STUN URL and the ``n``-th usable
TURN URL (each list wrapping around). ``LinkManager`` counts an attempt as used up when a
link to that peer fails before it ever connected, so a dead server is passed over on the
next try. Pure functions on plain data; nothing here imports aiortc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import IceServer

__all__ = ["IcePlan", "plan_ice_servers", "select_ice_servers"]

# aiortc's own patterns (rtcicetransport.STUN_REGEX / TURN_REGEX)
_STUN_RE = re.compile(r"(?P<scheme>stun|stuns):(?P<host>[^?:]+)(:(?P<port>[0-9]+?))?(\?transport=(?P<transport>.*))?")
_TURN_RE = re.compile(r"(?P<scheme>turn|turns):(?P<host>[^?:]+)(:(?P<port>[0-9]+?))?(\?transport=(?P<transport>.*))?")


@dataclass(frozen=True, slots=True)
class IcePlan:
    stun: tuple[IceServer, ...]
    """usable STUN URLs in configuration order, one per entry."""
    turn: tuple[IceServer, ...]
    """usable TURN URLs with their credentials, in configuration order."""
    unusable: tuple[str, ...]
    """URLs aiortc would skip, each with the reason."""

    @property
    def rotates(self) -> bool:
        """More than one STUN or TURN URL: a set-up uses one of each, the next after a failure."""
        return len(self.stun) > 1 or len(self.turn) > 1


def _why_unusable(url: str, server: IceServer) -> str | None:
    if url.startswith("stun"):
        match = _STUN_RE.fullmatch(url)
        if match is None:
            return "malformed STUN URL"
        if match["scheme"] == "stuns":
            return "stuns: is not supported by aiortc"
        if match["transport"] is not None:
            return "a STUN URL takes no transport"
        return None
    match = _TURN_RE.fullmatch(url)
    if match is None:
        return "malformed URL (expected stun:, turn: or turns:)"
    transport = match["transport"] or ("udp" if match["scheme"] == "turn" else "tcp")
    if match["scheme"] == "turn" and transport not in ("udp", "tcp"):
        return f"turn: over {transport} is not supported by aiortc (udp or tcp)"
    if match["scheme"] == "turns" and transport != "tcp":
        return f"turns: over {transport} is not supported by aiortc (tcp only)"
    if not server.username or not server.credential:
        return "a TURN server needs a username and credential"
    return None


def plan_ice_servers(servers: tuple[IceServer, ...]) -> IcePlan:
    """Split the configuration into the STUN and TURN URLs aiortc can use, one URL per entry."""
    stun: list[IceServer] = []
    turn: list[IceServer] = []
    unusable: list[str] = []
    for server in servers:
        for url in server.urls:
            reason = _why_unusable(url, server)
            if reason is not None:
                unusable.append(f"{url} ({reason})")
            elif url.startswith("stun"):
                stun.append(IceServer(urls=(url,)))
            else:
                turn.append(IceServer(urls=(url,), username=server.username, credential=server.credential))
    return IcePlan(tuple(stun), tuple(turn), tuple(unusable))


def select_ice_servers(plan: IcePlan, attempt: int) -> tuple[IceServer, ...]:
    """The (at most) one STUN and one TURN server set-up number ``attempt`` uses."""
    chosen: list[IceServer] = []
    if plan.stun:
        chosen.append(plan.stun[attempt % len(plan.stun)])
    if plan.turn:
        chosen.append(plan.turn[attempt % len(plan.turn)])
    return tuple(chosen)
