"""The composition root's product: every component of a running node, in one typed place.

Handlers read it from the app (``request.app[CONTEXT]``); the embeddable
``Node`` holds the same object, so HTTP and in-process calls share one path.
Optional components are ``None`` until the features that own them are enabled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .config import NodeConfig
from .engine.registry import ModelRegistry
from .engine.service import InferenceService
from .identity import DeviceIdentity, NodeIdentity

if TYPE_CHECKING:
    from .audit import AuditLog
    from .capability import CapabilityService
    from .discovery import DiscoveryService, PeerTable
    from .hub.external import ExternalEngines
    from .hub.interceptor import ChatCompletionInterceptor
    from .hub.keys import ApiKeyStore
    from .hub.quotas import QuotaBook
    from .hub.substitution import SubstitutionPolicy
    from .hub.usage import UsageStore
    from .metrics import NodeMetrics
    from .offload.router import OffloadRouter
    from .pairing import PairingApprover, PairingStore
    from .pairing.qr_service import QrPairingService
    from .security import NonceCache
    from .transport.links import LinkManager
    from .transport.presence import PresenceConnection


@dataclass(slots=True)
class NodeContext:
    config: NodeConfig
    identity: DeviceIdentity
    device_name: str
    registry: ModelRegistry
    inference: InferenceService
    started_at: float = field(default_factory=time.time)
    base_url: str | None = None
    local_base_url: str | None = None
    """the URL programs on this machine use (loopback when the node also listens there)."""
    pairings: PairingStore | None = None
    nonces: NonceCache | None = None
    approver: PairingApprover | None = None
    audit: AuditLog | None = None
    qr: QrPairingService | None = None
    node_identity: NodeIdentity | None = None
    """identity plus this process's instance id (health proofs, clone detection)."""
    peers: PeerTable | None = None
    discovery: DiscoveryService | None = None
    http: aiohttp.ClientSession | None = None
    """The node's outgoing HTTP client (pairing, health checks, forwarding)."""
    capability: CapabilityService | None = None
    """Local tok/s scores per model (node/capability); inert unless offload is enabled."""
    metrics: NodeMetrics | None = None
    """Prometheus instruments of this node (node/metrics.py), served at ``GET /metrics``."""
    api_keys: ApiKeyStore | None = None
    """API keys for ``Authorization: Bearer`` callers (node/hub/keys.py)."""
    interceptor: ChatCompletionInterceptor | None = None
    """the host's first-chance hook for chat completions (node/hub/interceptor.py)."""
    substitution: SubstitutionPolicy | None = None
    """which model serves a request for one nobody here has (node/hub/substitution.py)."""
    usage: UsageStore | None = None
    """requests and tokens per day, app, device and model (node/hub/usage.py)."""
    quotas: QuotaBook | None = None
    """per-app limits (node/hub/quotas.py); empty unless ``[[hub.quotas]]`` is configured."""
    external: ExternalEngines | None = None
    """models served by other OpenAI-compatible servers (node/hub/external.py)."""
    router: OffloadRouter | None = None
    """Decides per request: local, forwarded to a peer, or refused (offload enabled, HTTP only)."""
    links: LinkManager | None = None
    """WebRTC links to rendezvous-paired peers (offload enabled and ``rendezvous_url`` set)."""
    presence: PresenceConnection | None = None
    """The presence connection to the rendezvous that carries the links' signaling."""

    def peer_base_url(self, device_id: str) -> str | None:
        """A discovered peer's base URL, when discovery knows the device."""
        peer = self.peers.get(device_id) if self.peers is not None else None
        return peer.base_url if peer is not None else None


CONTEXT = web.AppKey("dvai_context", NodeContext)
