"""``DiscoveryService``: mDNS + static peers + custom discovery + health checks, one owner.

The app constructs one per node (when ``offload.enabled``), starts it after the HTTP
server listens, calls ``update_advertisement()`` when loaded models, capability or
queue depths change, and stops it before the HTTP server goes away (so the goodbye is
sent while the node still answers). All tasks it starts are cancelled and awaited in
``stop()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aiohttp

from ..config import OffloadConfig
from ..identity import NodeIdentity
from .advert import AdvertisedInfo
from .custom import CustomDiscovery, load_custom_discovery
from .health import HealthChecker, report_outcome
from .logonce import WarnOnce
from .mdns import MdnsDiscovery
from .merge import MergeOutcome
from .model import PeerClaim, PeerSeed, PeerState
from .peers import PeerTable
from .static import seeds_from_known_peers

_log = logging.getLogger("node.discovery")

AdvertisedInfoProvider = Callable[[], AdvertisedInfo]


class DiscoveryService:
    """Finds peers and keeps ``table`` current; advertises this node on the LAN."""

    def __init__(
        self,
        config: OffloadConfig,
        identity: NodeIdentity,
        table: PeerTable,
        session: aiohttp.ClientSession,
        advertised_info_provider: AdvertisedInfoProvider,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.identity = identity
        self.table = table
        self._session = session
        self._provider = advertised_info_provider
        self._monotonic = monotonic
        self._warn = WarnOnce(_log)
        self._health: HealthChecker | None = None
        self._custom: CustomDiscovery | None = None
        self._mdns: MdnsDiscovery | None = None
        self._custom_urls: set[str] = set()

    @property
    def advertising(self) -> bool:
        """True while this node is announced over mDNS."""
        return self._mdns is not None

    async def start(self) -> None:
        """Start every source. Bad static/custom config raises ``ConfigError`` before anything runs."""
        static_seeds = seeds_from_known_peers(self.config.known_peers)
        spec = self.config.custom_discovery
        function = load_custom_discovery(spec) if spec else None
        self._health = HealthChecker(
            table=self.table, session=self._session, identity=self.identity,
            interval=self.config.health_interval, warn=self._warn, monotonic=self._monotonic,
        )
        self._health.start()
        try:
            self._health.set_seeds("static", static_seeds)
            if spec and function is not None:
                self._custom = CustomDiscovery(
                    spec=spec, function=function, interval=self.config.custom_discovery_interval,
                    on_seeds=self._on_custom_seeds, warn=self._warn,
                )
                self._custom.start()
            if self.config.discover_lan:
                await self._start_mdns()
        except BaseException:
            await self.stop()  # nothing started here outlives a failed start
            raise

    async def update_advertisement(self) -> None:
        """Re-read ``advertised_info_provider()`` and re-announce if the TXT record changed."""
        if self._mdns is not None:
            await self._mdns.update(self._provider())

    async def check_now(self) -> None:
        """Run one health round at once (e.g. before answering ``GET /v1/dvai/peers?fresh=1``)."""
        if self._health is not None:
            await self._health.run_round()

    async def stop(self) -> None:
        """Goodbye on mDNS first, then stop custom discovery and health checks."""
        mdns, self._mdns = self._mdns, None
        custom, self._custom = self._custom, None
        health, self._health = self._health, None
        if mdns is not None:
            await mdns.stop()
        if custom is not None:
            await custom.stop()
        if health is not None:
            await health.stop()

    async def _start_mdns(self) -> None:
        mdns = MdnsDiscovery(
            identity=self.identity, interfaces=self.config.discover_interfaces,
            on_claim=self._on_claim, on_gone=self._on_gone, warn=self._warn, monotonic=self._monotonic,
        )
        try:
            await mdns.start(self._provider())
        except OSError as exc:
            # No multicast here (no interface, firewall, sandbox): static/custom peers still work.
            _log.error("mDNS discovery disabled: cannot open multicast sockets (%s)", exc)
            await mdns.stop()
            return
        self._mdns = mdns

    def _on_claim(self, claim: PeerClaim) -> None:
        outcome = self.table.observe(claim)
        report_outcome(self._warn, self.table, outcome, claim.device_id, claim.base_url)
        if self._health is None:
            return
        entry = self.table.entry(claim.device_id)
        if outcome is MergeOutcome.CANDIDATE and entry is not None:
            self._health.poke(entry.base_url)  # is the current address still alive?
        if outcome in (MergeOutcome.ADDED, MergeOutcome.CANDIDATE) or (
            entry is not None and entry.state is not PeerState.REACHABLE
        ):
            self._health.poke(claim.base_url)

    def _on_gone(self, device_id: str) -> None:
        if self.table.withdraw(device_id, "mdns"):
            _log.info("peer %s left (mDNS goodbye)", device_id)

    def _on_custom_seeds(self, seeds: tuple[PeerSeed, ...]) -> None:
        urls = {seed.base_url for seed in seeds}
        for url in self._custom_urls - urls:
            owner = self.table.owner_of(url)
            entry = self.table.entry(owner) if owner else None
            if entry is not None and "custom" in entry.claims and entry.claims["custom"].base_url == url:
                self.table.withdraw(entry.device_id, "custom")
        self._custom_urls = urls
        if self._health is not None:
            self._health.set_seeds("custom", seeds)
