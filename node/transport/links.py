"""WebRTC links to rendezvous-paired peers: set-up through sealed signaling, keep-alive,
idle close, and the ``PeerLink`` the offload router forwards through.

``LinkManager`` holds at most one ``RtcLink`` per peer. A link is opened on demand (the
first ``connect``), pinged every ``LINK_PING_INTERVAL_S`` while it carries streams (a
peer silent for ``LINK_DEAD_AFTER_S`` then is declared gone, so a stream to a killed
peer ends within seconds, not after ICE's 30 s consent timeout), pinged now and then
while idle (for its round-trip time), and closed after ``offload.link_idle_timeout``
without a request. A failed link is simply replaced by the next ``connect``.

Signaling messages are JSON objects sealed with ``SignalSealer`` (``node.transport.
signal_crypto``): ``{"k": "offer" | "answer" | "close", "l": link id, "sdp": ...}``. A
message from a device we are not paired with, or one that fails to open, is dropped
without a reply. When both ends offer at once (glare), the offer of the device with the
smaller device id wins and the other end answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import IceServer
from ..constants import LINK_MAX_SIGNAL_BYTES, LINK_MAX_STREAM_BUFFER_BYTES
from .ice import IcePlan, plan_ice_servers, select_ice_servers
from .link import LinkRequest, PeerLinkError
from .mux import ChannelResponse, InboundRequest, LinkClosedError, ResponseWriter, StreamMux
from .signal_crypto import SignalRejectedError, SignalSealer
from .webrtc import LinkState, RtcLink

__all__ = [
    "DataChannelLink",
    "LinkManager",
    "LinkUnavailableError",
    "PeerRequestHandler",
    "SignalSender",
]

log = logging.getLogger(__name__)

LINK_PING_INTERVAL_S = 0.5
"""seconds between pings on a link that carries streams."""
LINK_DEAD_AFTER_S = 2.0
"""seconds without any frame from a peer, while streams are open, before the link is failed:
a killed peer's streams end with a clean error within about this long."""
LINK_IDLE_PING_S = 15.0
"""seconds between pings on an idle link (keeps its round-trip time and NAT binding fresh)."""
LINK_SETUP_ABANDON_S = 60.0
"""seconds after which a link still connecting is dropped even if nobody waits for it (a caller
waiting gives up after its own connect timeout)."""
_KEEPER_TICK_S = 0.25


class LinkUnavailableError(PeerLinkError):
    """No link to the peer could be set up (not paired, rendezvous down, peer offline, ICE failed)."""


class SignalSender(Protocol):
    async def send(self, to: str, data: str, *, message_id: str | None = None) -> None: ...


PeerRequestHandler = Callable[[str, InboundRequest, ResponseWriter], Awaitable[None]]
"""``handler(peer_id, request, writer)``: serve a request that arrived over the link from ``peer_id``."""


@dataclass(frozen=True, slots=True)
class LinkInfo:
    state: LinkState
    rtt_ms: float | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "rttMs": None if self.rtt_ms is None else round(self.rtt_ms, 2),
                "error": self.error}


class LinkManager:
    """Every WebRTC link of this node, by peer device id."""

    def __init__(
        self,
        *,
        device_id: str,
        pairing_key_for: Callable[[str], bytes | None],
        ice_servers: Callable[[], tuple[IceServer, ...]] = tuple,
        relay_only: bool = False,
        connect_timeout: float = 15.0,
        idle_timeout: float = 120.0,
        on_request: PeerRequestHandler | None = None,
        max_request_body: int = LINK_MAX_STREAM_BUFFER_BYTES,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self._pairing_key_for = pairing_key_for
        self._ice_servers = ice_servers
        self._relay_only = relay_only
        self.connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._on_request = on_request
        self._max_request_body = max_request_body
        self._clock = clock
        self._monotonic = monotonic
        self._links: dict[str, RtcLink] = {}
        self._last: dict[str, LinkInfo] = {}
        self._superseded: set[str] = set()
        self._sealers: dict[str, tuple[bytes, SignalSealer]] = {}
        self._signal: SignalSender | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pinging: set[str] = set()
        self._last_ping: dict[str, float] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        self._ice_attempts: dict[str, int] = {}
        self._ice_warned: IcePlan | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name="link-keeper")
            # aiortc takes ~0.5 s of CPU to import: done now, off the event loop, rather than
            # inside the first link set-up, where it would stall every stream the node serves
            task = asyncio.create_task(asyncio.to_thread(importlib.import_module, "aiortc"), name="aiortc-import")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        links = list(self._links.values())
        for link in links:
            link.close("the node is stopping")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(link.wait_closed() for link in links), return_exceptions=True)

    def attach_signaling(self, sender: SignalSender | None) -> None:
        """The presence connection came up (``sender``) or went down (``None``)."""
        self._signal = sender

    @property
    def signaling_up(self) -> bool:
        return self._signal is not None

    # -- readers --------------------------------------------------------------------------
    def info(self, peer_id: str) -> LinkInfo | None:
        """The current link's state and round-trip time, or how the last one ended."""
        link = self._links.get(peer_id)
        if link is not None:
            return LinkInfo(link.state, link.rtt_ms, link.error)
        return self._last.get(peer_id)

    def link_for(self, peer_id: str) -> DataChannelLink:
        return DataChannelLink(self, peer_id)

    # -- connecting -----------------------------------------------------------------------
    async def connect(self, peer_id: str, within: float) -> StreamMux:
        """The open link to ``peer_id``, set up within ``within`` seconds if needed;
        ``LinkUnavailableError`` otherwise."""
        timeout = within
        deadline = self._monotonic() + timeout
        while True:
            link = self._links.get(peer_id)
            if link is None or link.state in (LinkState.CLOSED, LinkState.FAILED):
                link = self._offer(peer_id)
            mux = link.mux
            if mux is not None and not mux.closed:
                return mux
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                link.fail("set-up timed out")
                raise LinkUnavailableError(f"no link to {peer_id[:16]} within {timeout:g} s")
            try:
                async with asyncio.timeout(remaining):
                    return await asyncio.shield(link.ready)
            except TimeoutError:
                link.fail("set-up timed out")
                raise LinkUnavailableError(f"no link to {peer_id[:16]} within {timeout:g} s") from None
            except LinkClosedError as exc:
                if link.link_id in self._superseded:
                    continue  # glare: the peer's simultaneous offer replaced ours; wait for that one
                raise LinkUnavailableError(f"link to {peer_id[:16]} failed: {exc}") from None

    def _offer(self, peer_id: str) -> RtcLink:
        if self._closed:
            raise LinkUnavailableError("the node is stopping")
        if self._signal is None:
            raise LinkUnavailableError("not connected to the rendezvous")
        key = self._pairing_key_for(peer_id)
        if key is None:
            raise LinkUnavailableError(f"not paired with {peer_id[:16]}")
        link = self._new_link(peer_id, secrets.token_hex(16), offerer=True)
        self._spawn(self._send_offer(link, key), link)
        return link

    async def _send_offer(self, link: RtcLink, key: bytes) -> None:
        sdp = await link.create_offer()
        await self._send(link.peer_id, key, {"k": "offer", "l": link.link_id, "sdp": sdp}, link.link_id)

    def _new_link(self, peer_id: str, link_id: str, *, offerer: bool) -> RtcLink:
        async def serve(request: InboundRequest, writer: ResponseWriter) -> None:
            assert self._on_request is not None
            await self._on_request(peer_id, request, writer)

        plan = plan_ice_servers(self._ice_servers())
        self._warn_about(plan)
        ice_servers = select_ice_servers(plan, self._ice_attempts.get(peer_id, 0))
        link = RtcLink(peer_id=peer_id, link_id=link_id, offerer=offerer, ice_servers=ice_servers,
                       relay_only=self._relay_only, on_request=serve if self._on_request else None,
                       max_request_body=self._max_request_body,
                       on_gone=self._gone, monotonic=self._monotonic)
        self._links[peer_id] = link
        return link

    def _warn_about(self, plan: IcePlan) -> None:
        """Say once per configuration what aiortc will not do with it."""
        if plan == self._ice_warned:
            return
        self._ice_warned = plan
        if plan.unusable:
            log.warning("ICE servers aiortc cannot use, skipped: %s", "; ".join(plan.unusable))
        if plan.rotates:
            log.warning("%d STUN and %d TURN URLs are configured, but aiortc contacts one STUN and one TURN "
                        "server per link set-up: set-ups take them in turn, the next after one that failed",
                        len(plan.stun), len(plan.turn))

    def _gone(self, link: RtcLink) -> None:
        if link.state is LinkState.FAILED and link.connected_at is None:  # never connected: next servers
            self._ice_attempts[link.peer_id] = self._ice_attempts.get(link.peer_id, 0) + 1
        if self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]
        self._last[link.peer_id] = LinkInfo(link.state, link.rtt_ms, link.error)
        self._last_ping.pop(link.peer_id, None)

    # -- signaling ------------------------------------------------------------------------
    async def on_signal(self, from_id: str, data: str) -> None:
        """A relayed message; anything not sealed by a paired device is dropped silently."""
        key = self._pairing_key_for(from_id)
        if key is None or self._closed:
            log.debug("dropped a signaling message from unpaired device %s", from_id[:16])
            return
        try:
            message = _parse_signal(self._sealer(from_id, key).open(data))
        except SignalRejectedError as exc:
            log.warning("dropped a signaling message claiming to be from %s: %s", from_id[:16], exc)
            return
        kind, link_id, sdp = message
        current = self._links.get(from_id)
        if kind == "offer":
            self._on_offer(from_id, key, link_id, sdp, current)
        elif kind == "answer":
            if current is not None and current.offerer and current.link_id == link_id \
                    and current.state is LinkState.CONNECTING:
                self._spawn(current.accept_answer(sdp), current)
        elif current is not None and current.link_id == link_id:
            current.close("closed by the peer")

    def _on_offer(self, peer_id: str, key: bytes, link_id: str, sdp: str, current: RtcLink | None) -> None:
        if current is not None and current.link_id == link_id:
            return  # a duplicate; the sealer already refuses replays, this is belt and braces
        if current is not None and current.offerer and current.state is LinkState.CONNECTING:
            if self.device_id < peer_id:
                return  # glare: our offer wins; the peer answers it
            self._superseded.add(current.link_id)
            current.fail("glare: answering the peer's simultaneous offer")
        elif current is not None:
            current.close("the peer opened a new link")
        link = self._new_link(peer_id, link_id, offerer=False)

        async def answer() -> None:
            answer_sdp = await link.accept_offer(sdp)
            await self._send(peer_id, key, {"k": "answer", "l": link_id, "sdp": answer_sdp}, link_id)

        self._spawn(answer(), link)

    def on_undeliverable(self, message_id: str) -> None:
        """The rendezvous could not deliver our message ``message_id`` (the peer is offline)."""
        for link in list(self._links.values()):
            if link.link_id == message_id and link.state is LinkState.CONNECTING:
                link.fail("the peer is not connected to the rendezvous")

    async def _send(self, peer_id: str, key: bytes, message: dict[str, str], message_id: str) -> None:
        signal = self._signal
        if signal is None:
            raise LinkUnavailableError("not connected to the rendezvous")
        envelope = self._sealer(peer_id, key).seal(json.dumps(message, separators=(",", ":")).encode())
        await signal.send(peer_id, envelope, message_id=message_id[:64])

    def _sealer(self, peer_id: str, key: bytes) -> SignalSealer:
        cached = self._sealers.get(peer_id)
        if cached is None or cached[0] != key:  # re-paired: a new key, fresh counters
            cached = (key, SignalSealer(key, self.device_id, peer_id, clock=self._clock))
            self._sealers[peer_id] = cached
        return cached[1]

    def _spawn(self, work: Awaitable[None], link: RtcLink) -> None:
        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed set-up fails its link, nothing else
                log.info("link %s set-up to %s failed: %s", link.link_id[:8], link.peer_id[:16], exc)
                link.fail(f"set-up failed: {type(exc).__name__}: {exc}"[:200])

        task = asyncio.get_running_loop().create_task(run(), name="link-setup")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- keep-alive and idle close ----------------------------------------------------------
    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(_KEEPER_TICK_S)
            now = self._monotonic()
            for link in list(self._links.values()):
                try:
                    self._tend(link, now)
                except Exception:  # noqa: BLE001 - one link's trouble never stops the keeper
                    log.exception("tending link to %s failed", link.peer_id[:16])

    def _tend(self, link: RtcLink, now: float) -> None:
        if self._pairing_key_for(link.peer_id) is None:
            link.close("the pairing was revoked")
            return
        mux = link.mux
        if mux is None:
            if link.state is LinkState.CONNECTING and now - link.created_at > LINK_SETUP_ABANDON_S:
                link.fail("set-up never finished")  # e.g. an answer whose offerer vanished
            return
        busy = mux.open_streams > 0
        mux.refresh_liveness()
        if busy and now - mux.last_received > LINK_DEAD_AFTER_S:
            link.fail(f"ping timeout: nothing from the peer for {LINK_DEAD_AFTER_S:g} s")
            return
        if not busy and now - mux.last_activity > self._idle_timeout:
            with contextlib.suppress(Exception):
                key = self._pairing_key_for(link.peer_id)
                if key is not None and self._signal is not None:
                    self._spawn(self._send(link.peer_id, key, {"k": "close", "l": link.link_id, "sdp": ""},
                                           link.link_id), link)
            link.close(f"idle for {self._idle_timeout:g} s")
            return
        interval = LINK_PING_INTERVAL_S if busy else LINK_IDLE_PING_S
        if link.peer_id not in self._pinging and now - self._last_ping.get(link.peer_id, 0.0) >= interval:
            self._pinging.add(link.peer_id)
            self._last_ping[link.peer_id] = now
            task = asyncio.get_running_loop().create_task(self._ping(link, mux), name="link-ping")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ping(self, link: RtcLink, mux: StreamMux) -> None:
        try:
            link.rtt_ms = await mux.ping(within=LINK_DEAD_AFTER_S) * 1000
        except TimeoutError:
            # A pong queued behind a bulk transfer is late, not lost: only silence fails the link.
            mux.refresh_liveness()
            if self._monotonic() - mux.last_received > LINK_DEAD_AFTER_S:
                link.fail(f"ping timeout: nothing from the peer for {LINK_DEAD_AFTER_S:g} s")
        except LinkClosedError:
            pass
        finally:
            self._pinging.discard(link.peer_id)


def _parse_signal(plaintext: bytes) -> tuple[str, str, str]:
    try:
        message = json.loads(plaintext)
    except (ValueError, RecursionError):
        raise SignalRejectedError("signaling message is not JSON") from None
    if not isinstance(message, dict):
        raise SignalRejectedError("signaling message is not an object")
    kind, link_id, sdp = message.get("k"), message.get("l"), message.get("sdp", "")
    if kind not in ("offer", "answer", "close") or not isinstance(link_id, str) or not 8 <= len(link_id) <= 64:
        raise SignalRejectedError("signaling message has no valid kind or link id")
    if not isinstance(sdp, str) or len(sdp) > LINK_MAX_SIGNAL_BYTES or (kind != "close" and not sdp):
        raise SignalRejectedError("signaling message has no valid SDP")
    return kind, link_id, sdp


class DataChannelLink:
    """The :class:`~node.transport.link.PeerLink` to one rendezvous peer: requests travel as
    frames on its data channel. Every failure is a ``PeerLinkError`` (``LinkUnavailableError``,
    ``LinkClosedError``, ``StreamFailedError``)."""

    def __init__(self, manager: LinkManager, peer_id: str) -> None:
        self._manager = manager
        self.peer_id = peer_id

    async def open(self, request: LinkRequest, *, connect_timeout: float) -> ChannelResponse:
        """Send ``request`` and return once the response head arrived. ICE and DTLS take longer
        than a TCP connect, so the set-up may use up to ``offload.link_connect_timeout``."""
        timeout = max(connect_timeout, self._manager.connect_timeout)
        mux = await self._manager.connect(self.peer_id, timeout)
        return await mux.open(request.method, request.path, request.headers, request.body)
