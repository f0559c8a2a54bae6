"""mDNS / DNS-SD: advertise ``_dvai._tcp.local.``, browse for peers, send goodbyes.

The service instance name is the device id (``dv….``); names derived from unique keys
do not collide, so registration skips the RFC 6762 §8.1 probe round (one second) and a
node appears on the LAN at once. Two copies of one identity would share the name:
they are told apart by the ``in`` (instance id) TXT key and reported loudly instead.

Every record from the LAN is treated as hostile: bounded TXT parsing, validated values,
one warning per source then debug, bounded resolution concurrency and bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..constants import (
    MAX_CONCURRENT_RESOLVES,
    MAX_TRACKED_SERVICES,
    MDNS_RESOLVE_TIMEOUT_S,
    MDNS_SERVICE_TYPE,
    MDNS_UPDATE_MIN_INTERVAL_S,
)
from ..identity import NodeIdentity
from .advert import AdvertisedInfo, claim_from_txt, decode_txt, encode_txt, pick_address
from .logonce import WarnOnce
from .model import PeerClaim

_log = logging.getLogger(__name__)

ClaimSink = Callable[[PeerClaim], None]
GoneSink = Callable[[str], None]


class MdnsDiscovery:
    """Advertises this node and reports peers' claims (``on_claim``) and goodbyes (``on_gone``)."""

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        interfaces: Sequence[str],
        on_claim: ClaimSink,
        on_gone: GoneSink,
        warn: WarnOnce | None = None,
        service_type: str = MDNS_SERVICE_TYPE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._identity = identity
        self._interfaces = tuple(interfaces)
        self._on_claim = on_claim
        self._on_gone = on_gone
        self._warn = warn or WarnOnce(_log)
        self._type = service_type
        self._monotonic = monotonic
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._txt: dict[str, str] = {}
        self._announce: Awaitable[object] | None = None
        self._last_update = -1e9
        self._deferred: asyncio.Task[None] | None = None
        self._pending_info: AdvertisedInfo | None = None
        self._resolves: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._names: OrderedDict[str, str] = OrderedDict()
        self._resolve_slots = asyncio.Semaphore(MAX_CONCURRENT_RESOLVES)

    @property
    def service_name(self) -> str:
        return f"{self._identity.device_id}.{self._type}"

    async def start(self, info: AdvertisedInfo) -> None:
        """Open the sockets, announce this node, start browsing."""
        ip_version = IPVersion.All if any(":" in i for i in self._interfaces) else IPVersion.V4Only
        self._zc = AsyncZeroconf(
            interfaces=list(self._interfaces) or InterfaceChoice.All, ip_version=ip_version
        )
        self._info = self._service_info(info)
        self._txt = encode_txt(self._identity, info)
        self._announce = await self._zc.async_register_service(self._info, cooperating_responders=True)
        self._last_update = self._monotonic()
        # QM (multicast-answer) questions from the first query on: a unicast (QU) answer goes
        # to whichever socket on this host owns port 5353 (SO_REUSEPORT), often not ours,
        # which delayed finding existing peers by a second.
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, self._type, handlers=[self._on_change], question_type=DNSQuestionType.QM
        )

    async def update(self, info: AdvertisedInfo) -> None:
        """Re-announce when the TXT record changed; at most every ``MDNS_UPDATE_MIN_INTERVAL_S``."""
        if self._zc is None:
            return
        self._pending_info = info
        wait = MDNS_UPDATE_MIN_INTERVAL_S - (self._monotonic() - self._last_update)
        if wait > 0:
            if self._deferred is None or self._deferred.done():
                self._deferred = asyncio.create_task(self._update_later(wait), name="dvai-mdns-update")
            return
        await self._publish_pending()

    async def stop(self) -> None:
        """Stop browsing, send goodbyes for our record, close the sockets."""
        zc, self._zc = self._zc, None
        tasks = [t for t in (self._deferred, *self._resolves.values()) if t is not None]
        self._resolves.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if zc is not None:
            announce, self._announce = self._announce, None
            if isinstance(announce, asyncio.Future) and not announce.done():
                announce.cancel()  # the goodbye replaces any announcement still repeating
                with contextlib.suppress(asyncio.CancelledError):
                    await announce
            await zc.async_close()  # unregisters every service: goodbye packets (TTL 0)

    # -- advertising -----------------------------------------------------------

    def _service_info(self, info: AdvertisedInfo) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            self._type,
            self.service_name,
            port=info.port,
            properties=encode_txt(self._identity, info),
            server=f"{self._identity.device_id}.local.",
            parsed_addresses=list(info.addresses or self._own_addresses()),
        )

    def _own_addresses(self) -> list[str]:
        if self._interfaces:
            return [a for a in self._interfaces if "." in a or ":" in a]
        return local_ipv4_addresses()

    async def _update_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        await self._publish_pending()

    async def _publish_pending(self) -> None:
        info, self._pending_info = self._pending_info, None
        if info is None or self._zc is None or self._info is None:
            return
        new = self._service_info(info)
        txt = encode_txt(self._identity, info)
        if txt == self._txt and new.port == self._info.port and set(new.parsed_addresses()) == set(
            self._info.parsed_addresses()
        ):
            return
        self._info, self._txt = new, txt
        self._last_update = self._monotonic()
        self._announce = await self._zc.async_update_service(new)

    # -- browsing ----------------------------------------------------------------

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Browser callback (on the loop). Must never raise into zeroconf."""
        try:
            if state_change is ServiceStateChange.Removed:
                self._on_removed(name)
            else:
                self._schedule_resolve(name)
        except Exception:  # noqa: BLE001 - never break zeroconf's packet handling
            _log.exception("handling mDNS change for %r failed", name[:100])

    def _on_removed(self, name: str) -> None:
        self._again.discard(name)
        task = self._resolves.pop(name, None)
        if task is not None:
            task.cancel()
        device_id = self._names.pop(name, None)
        if device_id is not None:
            self._on_gone(device_id)

    def _schedule_resolve(self, name: str) -> None:
        if name in self._resolves:
            self._again.add(name)
            return
        if len(self._resolves) >= MAX_TRACKED_SERVICES:
            self._warn.warn(("mdns-flood",), "too many mDNS services at once; %r ignored", name[:100])
            return
        task = asyncio.create_task(self._resolve(name), name="dvai-mdns-resolve")
        self._resolves[name] = task
        task.add_done_callback(lambda _t: self._resolve_done(name, task))

    def _resolve_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolves.get(name) is task:
            del self._resolves[name]
            if name in self._again and self._zc is not None:
                self._again.discard(name)
                self._schedule_resolve(name)

    async def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        async with self._resolve_slots:
            try:
                info = AsyncServiceInfo(self._type, name)
            except BadTypeInNameException:
                self._warn.warn(("mdns", name[:100], "name"), "mDNS service name %r is malformed", name[:100])
                return
            if not await info.async_request(zc.zeroconf, MDNS_RESOLVE_TIMEOUT_S * 1000):
                self._warn.warn(("mdns", name, "unresolved"),
                                "mDNS service %r did not resolve (no SRV/TXT/address)", name[:100])
                return
        self._accept(name, info)

    def _accept(self, name: str, info: AsyncServiceInfo) -> None:
        problems: list[str] = []
        try:
            host = pick_address(info.parsed_scoped_addresses())
            if host is None:
                raise ValueError("no usable address")
            claim = claim_from_txt(decode_txt(info.text or b""), host, int(info.port or 0), problems)
        except ValueError as exc:
            self._warn.warn(("mdns", name, "bad"), "ignoring mDNS record %r: %s", name[:100], exc)
            return
        for problem in problems:
            self._warn.warn(("mdns", name, problem), "mDNS record %r: %s", name[:100], problem)
        if claim.device_id == self._identity.device_id:
            self._on_own_id(claim)
            return
        if name.lower() != f"{claim.device_id}.{self._type}".lower():
            # A node announces itself as <device id>._dvai._tcp: a record under any other name
            # that claims an id is an impersonation attempt (its goodbye could evict the real peer).
            self._warn.warn(("mdns", name, "name"), "ignoring mDNS record %r: its name does not match "
                            "the device id it claims", name[:100])
            return
        self._names[name] = claim.device_id
        self._names.move_to_end(name)
        while len(self._names) > MAX_TRACKED_SERVICES:
            self._names.popitem(last=False)
        self._on_claim(claim)

    def _on_own_id(self, claim: PeerClaim) -> None:
        if claim.instance_id == self._identity.instance_id:
            return  # our own announcement, looped back
        self._warn.warn(
            ("clone", claim.base_url, claim.instance_id or ""),
            "another running node at %s advertises THIS node's device id %s (its instance %s, ours "
            "%s): one state dir was copied. Fix: stop one node, delete identity.key in its state dir, "
            "start it again (it gets a new device id) and re-pair it.",
            claim.base_url, claim.device_id, claim.instance_id, self._identity.instance_id,
        )


def local_ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback only when there is nothing else."""
    addresses: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in addresses:
                addresses.append(ip.ip)
    outward = [a for a in addresses if not a.startswith("127.")]
    return outward or addresses or ["127.0.0.1"]
