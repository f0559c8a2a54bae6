"""One WebRTC link to one paired peer: an aiortc ``RTCPeerConnection`` carrying a single
reliable, ordered data channel, with the frame multiplexer on top.

``RtcLink`` is a small state machine (``LinkState``: connecting → direct | relayed →
closed | failed; ``_set_state`` logs every move). The offerer creates the channel
(label ``dvai-v1``) and gathers its candidates before the offer is sent, so one offer
and one answer (no trickled candidates) set the link up; both travel sealed through the
rendezvous (``node.transport.links``). The DTLS fingerprints inside those SDPs are what
authenticate the channel: a relay that swaps them cannot open the seals, and one that
alters a sealed message makes it fail authentication.

ICE servers come from ``offload.ice_servers`` only (one STUN and one TURN per set-up,
chosen by ``node.transport.ice``). aiortc's own default is a public STUN server, so an
empty list is passed explicitly: with no servers configured a link uses host candidates,
and nothing outside the operator's control is contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ..config import IceServer
from ..constants import LINK_MAX_STREAM_BUFFER_BYTES, LINK_SEND_LOW_WATER_BYTES
from .mux import InboundHandler, LinkClosedError, StreamMux

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection

__all__ = ["CHANNEL_LABEL", "LinkState", "RtcLink", "build_peer_connection"]

log = logging.getLogger(__name__)

CHANNEL_LABEL = "dvai-v1"
"""the data channel's label; also the frame protocol's version."""


class LinkState(StrEnum):
    CONNECTING = "connecting"
    DIRECT = "direct"
    RELAYED = "relayed"
    """through the operator's TURN server (it relays DTLS-encrypted bytes only)."""
    CLOSED = "closed"
    FAILED = "failed"

    @property
    def up(self) -> bool:
        return self in (LinkState.DIRECT, LinkState.RELAYED)


def build_peer_connection(ice_servers: tuple[IceServer, ...], *, relay_only: bool = False) -> RTCPeerConnection:
    """A peer connection that contacts exactly the configured ICE servers (possibly none)."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

    servers = [RTCIceServer(urls=list(server.urls), username=server.username, credential=server.credential)
               for server in ice_servers]
    configuration = RTCConfiguration(iceServers=servers)
    if relay_only:
        from aiortc.rtcconfiguration import RTCIceTransportPolicy

        configuration.iceTransportPolicy = RTCIceTransportPolicy.RELAY
    return RTCPeerConnection(configuration=configuration)


class _ChannelAdapter:
    """aiortc's ``RTCDataChannel`` as the multiplexer's ``FrameChannel``."""

    def __init__(self, channel: RTCDataChannel, close: Callable[[], None]) -> None:
        self._channel = channel
        self._close = close

    @property
    def buffered_amount(self) -> int:
        return int(self._channel.bufferedAmount)

    def send(self, data: bytes) -> None:
        self._channel.send(data)

    @property
    def peer_acks(self) -> object:
        """The last TSN the peer's SCTP stack acknowledged (aiortc keeps it private): it moves
        only while the peer is alive and reading."""
        return getattr(self._channel.transport, "_last_sacked_tsn", None)

    def close(self) -> None:
        self._close()


class RtcLink:
    """A link to ``peer_id``; ``ready`` resolves to the multiplexer once the channel is open."""

    def __init__(
        self,
        *,
        peer_id: str,
        link_id: str,
        offerer: bool,
        ice_servers: tuple[IceServer, ...],
        on_request: InboundHandler | None,
        on_gone: Callable[[RtcLink], None],
        relay_only: bool = False,
        max_request_body: int = LINK_MAX_STREAM_BUFFER_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.peer_id = peer_id
        self._max_request_body = max_request_body
        self.link_id = link_id
        self.offerer = offerer
        self.state = LinkState.CONNECTING
        self.rtt_ms: float | None = None
        self.error: str | None = None
        self.created_at = monotonic()
        self.connected_at: float | None = None
        self._monotonic = monotonic
        self._on_request = on_request
        self._on_gone = on_gone
        self.ice_servers = ice_servers
        """the (at most one STUN and one TURN) servers this link's set-up uses."""
        self._pc = build_peer_connection(ice_servers, relay_only=relay_only)
        self._mux: StreamMux | None = None
        self.ready: asyncio.Future[StreamMux] = asyncio.get_running_loop().create_future()
        self._closing: asyncio.Task[None] | None = None
        self._pc.on("connectionstatechange", self._on_connection_state)
        if not offerer:
            self._pc.on("datachannel", self._attach)

    # -- set-up -------------------------------------------------------------------------
    async def create_offer(self) -> str:
        """Create the channel, gather candidates, return the offer's SDP."""
        self._attach(self._pc.createDataChannel(CHANNEL_LABEL, ordered=True))
        await self._pc.setLocalDescription(await self._pc.createOffer())
        return str(self._pc.localDescription.sdp)

    async def accept_offer(self, sdp: str) -> str:
        """Apply the peer's offer; return our answer's SDP (candidates gathered)."""
        from aiortc import RTCSessionDescription

        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        return str(self._pc.localDescription.sdp)

    async def accept_answer(self, sdp: str) -> None:
        from aiortc import RTCSessionDescription

        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    # -- state ----------------------------------------------------------------------------
    @property
    def mux(self) -> StreamMux | None:
        return self._mux if self.state.up else None

    def _set_state(self, state: LinkState, error: str | None = None) -> None:
        if state is self.state:
            return
        log.info("link %s to %s: %s -> %s%s", self.link_id[:8], self.peer_id[:16], self.state.value,
                 state.value, f" ({error})" if error else "")
        self.state = state
        if error is not None:
            self.error = error
        if state in (LinkState.CLOSED, LinkState.FAILED):
            if not self.ready.done():
                self.ready.set_exception(LinkClosedError(error or state.value))
                self.ready.exception()  # retrieved: nobody may be waiting
            self._on_gone(self)

    def path_kind(self) -> LinkState:
        """``relayed`` when the selected candidate pair goes through TURN, else ``direct``."""
        sctp = self._pc.sctp
        try:
            connection = sctp.transport.transport._connection  # type: ignore[union-attr]  # noqa: SLF001
            pairs = list(connection._nominated.values())  # noqa: SLF001 - aiortc keeps the pair private
        except AttributeError:
            return LinkState.DIRECT
        relayed = any(p.local_candidate.type == "relay" or p.remote_candidate.type == "relay" for p in pairs)
        return LinkState.RELAYED if relayed else LinkState.DIRECT

    def fail(self, reason: str) -> None:
        """Give up on the link (set-up failed, ping timed out, protocol error)."""
        if self.state in (LinkState.CLOSED, LinkState.FAILED):
            return
        self._set_state(LinkState.FAILED, reason)
        if self._mux is not None:
            self._mux.close(reason)
        self._close_pc()

    def close(self, reason: str = "closed") -> None:
        if self.state in (LinkState.CLOSED, LinkState.FAILED):
            return
        self._set_state(LinkState.CLOSED, reason)
        if self._mux is not None:
            self._mux.close(reason)
        self._close_pc()

    async def wait_closed(self) -> None:
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await self._closing

    # -- aiortc events ----------------------------------------------------------------------
    def _attach(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL_LABEL or self._mux is not None:
            log.warning("peer %s opened an unexpected data channel %r; closing the link",
                        self.peer_id[:16], channel.label)
            self.fail("unexpected data channel")
            return
        channel.bufferedAmountLowThreshold = LINK_SEND_LOW_WATER_BYTES
        mux = StreamMux(_ChannelAdapter(channel, self._close_pc), initiator=self.offerer,
                        on_request=self._on_request, on_close=self._on_mux_closed,
                        max_request_body=self._max_request_body)
        self._mux = mux
        channel.on("message", mux.feed)
        channel.on("bufferedamountlow", mux.on_buffered_amount_low)
        channel.on("close", lambda: mux.close("the data channel closed"))

        def opened() -> None:
            if self.state is not LinkState.CONNECTING:
                return
            self.connected_at = self._monotonic()
            self._set_state(self.path_kind())
            if not self.ready.done():
                self.ready.set_result(mux)

        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    def _on_mux_closed(self, reason: str) -> None:
        failed = reason.startswith(("protocol error", "ping", "send failed"))
        if failed:
            self.fail(reason)
        else:
            self.close(reason)

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        if state == "failed":
            self.fail("ICE/DTLS failed: no path to the peer, or its fingerprint did not match")
        elif state == "closed":
            self.close("peer connection closed")

    def _close_pc(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._pc.close(), name="rtc-close")

    def describe(self) -> dict[str, Any]:
        return {"state": self.state.value, "rttMs": self.rtt_ms, "error": self.error}
