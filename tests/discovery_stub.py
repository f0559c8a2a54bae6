"""Test stubs for discovery: a stub ``/v1/dvai/health`` server and a stub node around it.

``HealthStubServer`` answers exactly the health shape the node serves
(``status``, ``version``, ``uptimeS``, ``deviceId``, ``deviceName``, ``models``,
plus ``instanceId`` and ``identityProof``); ``StubNode`` is that server plus a real
``DiscoveryService``. Loopback or test-created network namespaces only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from node.config import KnownPeer, OffloadConfig
from node.discovery.advert import AdvertisedInfo
from node.discovery.peers import PeerTable
from node.discovery.service import DiscoveryService
from node.identity import IdentityHandle, NodeIdentity, make_health_proof, open_node_identity


@dataclass
class StubModels:
    loaded: dict[str, float] = field(default_factory=lambda: {"gemma3-270m": 42.5})
    queue: dict[str, int] = field(default_factory=dict)


class HealthStubServer:
    """A stub of the node's ``GET /v1/dvai/health`` on ``host``:``port`` (0 = free port)."""

    def __init__(
        self,
        identity: NodeIdentity,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models: StubModels | None = None,
        answer_as: str | None = None,
        prove: bool = True,
    ) -> None:
        self.identity = identity
        self.host = host
        self.port = port
        self.models = models or StubModels()
        self.answer_as = answer_as
        """device id to claim instead of our own (an impostor)."""
        self.prove = prove
        self.requests = 0
        self._started = time.monotonic()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/dvai/health", self._health)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        if self.port == 0:
            self.port = free_port(self.host)
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        self.requests += 1
        body: dict[str, Any] = {
            "status": "ok",
            "version": "0.1.0",
            "uptimeS": round(time.monotonic() - self._started, 3),
            "deviceId": self.answer_as or self.identity.device_id,
            "deviceName": self.identity.device_name,
            "instanceId": self.identity.instance_id,
            "models": [
                {"id": model_id, "loaded": True, "queueDepth": self.models.queue.get(model_id, 0)}
                for model_id in self.models.loaded
            ],
        }
        challenge = request.query.get("challenge", "")
        if self.prove and challenge:
            body["identityProof"] = make_health_proof(self.identity, challenge)
        return web.json_response(body)


class StubNode:
    """A stub health server plus a real ``DiscoveryService`` and ``PeerTable``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        name: str,
        host: str = "127.0.0.1",
        interfaces: Sequence[str] = ("127.0.0.1",),
        known_peers: Sequence[KnownPeer] = (),
        custom_discovery: str | None = None,
        custom_discovery_interval: float = 30.0,
        discover_lan: bool = True,
        prove: bool = True,
    ) -> None:
        self.handle: IdentityHandle = open_node_identity(state_dir, name)
        self.identity = self.handle.identity
        self.config = OffloadConfig(
            enabled=True,
            discover_lan=discover_lan,
            discover_interfaces=tuple(interfaces),
            known_peers=tuple(known_peers),
            custom_discovery=custom_discovery,
            custom_discovery_interval=custom_discovery_interval,
        )
        self.server = HealthStubServer(self.identity, host=host, prove=prove)
        self.table = PeerTable.from_config(self.config, self_device_id=self.identity.device_id)
        self.session: aiohttp.ClientSession | None = None
        self.service: DiscoveryService | None = None
        self.addresses = (host,) if interfaces else ()

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    def advertised(self) -> AdvertisedInfo:
        return AdvertisedInfo(
            port=self.server.port,
            loaded_models=tuple(self.server.models.loaded),
            capability=dict(self.server.models.loaded),
            queue_depth=dict(self.server.models.queue),
            addresses=self.addresses,
        )

    async def start(self) -> None:
        await self.server.start()
        self.session = aiohttp.ClientSession()
        self.service = DiscoveryService(
            self.config, self.identity, self.table, self.session, self.advertised
        )
        await self.service.start()

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
        await self.server.stop()
        if self.session is not None:
            await self.session.close()
        self.handle.close()

    def sees(self, *others: StubNode, state: str = "reachable") -> bool:
        for other in others:
            peer = self.table.get(other.device_id)
            if peer is None or peer.state.value != state:
                return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
