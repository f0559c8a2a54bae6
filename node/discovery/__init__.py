"""Peer discovery: mDNS, static and custom sources, health checks, and the peer table.

The app builds a ``PeerTable`` and a ``DiscoveryService`` (see docs/discovery.md);
readers use ``PeerTable.snapshot()`` / ``get()`` and ``Peer.to_json()``.
"""

from __future__ import annotations

from .advert import AdvertisedInfo
from .model import HealthReport, Peer, PeerClaim, PeerSeed, PeerState
from .peers import PeerChange, PeerChangeKind, PeerTable, PeerWatch
from .service import DiscoveryService

__all__ = [
    "AdvertisedInfo",
    "DiscoveryService",
    "HealthReport",
    "Peer",
    "PeerChange",
    "PeerChangeKind",
    "PeerClaim",
    "PeerSeed",
    "PeerState",
    "PeerTable",
    "PeerWatch",
]
