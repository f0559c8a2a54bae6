"""dvai-rendezvous: the self-hostable service for QR pairing sessions and presence relay."""

from __future__ import annotations

from .app import create_app
from .config import RendezvousConfig, load_rendezvous_config
from .server import RendezvousServer, serve

__all__ = ["RendezvousConfig", "RendezvousServer", "create_app", "load_rendezvous_config", "serve"]
