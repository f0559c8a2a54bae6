"""Values of the discovery layer: what a source claims, what a health check saw, a Peer.

Import them from ``node.discovery.peers``; this module only keeps them apart from the
merge rules so both can use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..capability.curve import Curve, curve_to_json
from .validate import Via


class PeerState(StrEnum):
    PENDING = "pending"
    """announced or configured, no health answer yet."""
    REACHABLE = "reachable"
    """answered a health check within ``unreachable_after``."""
    UNREACHABLE = "unreachable"
    """silent for ``unreachable_after``; removed after ``remove_after``."""
    FLAGGED = "flagged"
    """its address answers as another device (see ``Peer.flag``); ignored for routing."""


@dataclass(frozen=True, slots=True)
class PeerClaim:
    """What one discovery source says about one device (already validated)."""

    device_id: str
    base_url: str
    source: Via
    device_name: str = ""
    dvai_version: str = ""
    app_id: str | None = None
    loaded_models: tuple[str, ...] = ()
    capability: Mapping[str, float] = field(default_factory=dict)
    """model id → decode tok/s, as claimed by the peer: advisory."""
    queue_depth: Mapping[str, int] = field(default_factory=dict)
    instance_id: str | None = None
    capability_curve: Mapping[str, Curve] = field(default_factory=dict)
    """model id → claimed aggregate tok/s by concurrency (already cleaned): advisory."""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """A validated ``GET /v1/dvai/health`` answer."""

    device_id: str
    status: str
    """``ok``, ``loading`` or ``degraded`` (a model failed to load)."""
    device_name: str = ""
    version: str = ""
    loaded_models: tuple[str, ...] = ()
    queue_depth: Mapping[str, int] = field(default_factory=dict)
    instance_id: str | None = None
    proven: bool = False
    """the answer carried a valid signature of our challenge by the device id's key."""
    features: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """loaded model id → what requests for it may ask for (``tools``, ``structured_outputs``…);
    absent for nodes older than the field."""
    capability_curve: Mapping[str, Curve] = field(default_factory=dict)
    """loaded model id → claimed aggregate tok/s by concurrency (``capabilityCurve``, cleaned)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """The reference's ``Peer`` type plus this node's view of it (state, queue, address)."""

    device_id: str
    device_name: str
    dvai_version: str
    base_url: str
    app_id: str | None
    loaded_models: tuple[str, ...]
    capability: Mapping[str, float]
    """peer-claimed model id → tok/s: advisory until verified."""
    via: Via
    secure: bool
    last_seen_at: int
    """unix ms of the last announcement or health answer."""
    state: PeerState = PeerState.PENDING
    address: str = ""
    """``host:port`` of ``base_url``."""
    queue_depth: Mapping[str, int] = field(default_factory=dict)
    sources: tuple[Via, ...] = ()
    """every source currently reporting this device."""
    identity_verified: bool = False
    """the last health answer proved possession of the device id's key."""
    flag: str | None = None
    """why the peer is ignored, when ``state`` is ``flagged``."""
    features: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """model id → features from its last health answer (empty: an older node, plain chat only)."""
    capability_curve: Mapping[str, Curve] = field(default_factory=dict)
    """peer-claimed model id → aggregate tok/s by concurrency (its health answer, else mDNS);
    only its shape is used, anchored at our own measurement. Absent: one point."""

    @property
    def reachable(self) -> bool:
        return self.state is PeerState.REACHABLE

    def to_json(self) -> dict[str, Any]:
        """The reference's camelCase ``Peer`` fields, then this node's extra fields."""
        return {
            "deviceId": self.device_id,
            "deviceName": self.device_name,
            "dvaiVersion": self.dvai_version,
            "baseUrl": self.base_url,
            "appId": self.app_id,
            "loadedModels": list(self.loaded_models),
            "capability": dict(self.capability),
            "via": self.via,
            "secure": self.secure,
            "lastSeenAt": self.last_seen_at,
            "state": self.state.value,
            "address": self.address,
            "queueDepth": dict(self.queue_depth),
            "sources": list(self.sources),
            "identityVerified": self.identity_verified,
            "flag": self.flag,
            "features": {model: list(values) for model, values in self.features.items()},
            "capabilityCurve": {model: curve_to_json(curve) for model, curve in self.capability_curve.items()},
        }


@dataclass(frozen=True, slots=True)
class PeerSeed:
    """An address to health-check that a source (static config, custom discovery) named.

    It becomes a peer when ``GET /v1/dvai/health`` there answers; with ``device_id`` set
    it is listed (pending) at once and the answer must carry that id.
    """

    base_url: str
    source: Via
    device_id: str | None = None
    device_name: str = ""
    app_id: str | None = None
    loaded_models: tuple[str, ...] = ()
    capability: Mapping[str, float] = field(default_factory=dict)

    def claim(self, device_id: str, report: HealthReport | None = None) -> PeerClaim:
        return PeerClaim(
            device_id=device_id,
            base_url=self.base_url,
            source=self.source,
            device_name=self.device_name or (report.device_name if report else ""),
            dvai_version=report.version if report else "",
            app_id=self.app_id,
            loaded_models=self.loaded_models or (report.loaded_models if report else ()),
            capability=self.capability,
            instance_id=report.instance_id if report else None,
        )
