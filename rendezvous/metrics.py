"""Prometheus metrics of one rendezvous app, on its own registry (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "RendezvousMetrics"]


class RendezvousMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "dvai_rendezvous_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.sessions_created = Counter("dvai_rendezvous_sessions_created", "pairing sessions created", registry=r)
        self.sessions_ended = Counter(
            "dvai_rendezvous_sessions_ended", "pairing sessions ended, by how", ["outcome"], registry=r
        )
        self.rate_limited = Counter(
            "dvai_rendezvous_rate_limited", "requests refused by a rate limit", ["rule"], registry=r
        )
        self.ws_connections = Gauge(
            "dvai_rendezvous_ws_connections", "authenticated WebSocket connections", registry=r
        )
        self.ws_auth_failures = Counter(
            "dvai_rendezvous_ws_auth_failures", "WebSocket challenge answers refused", registry=r
        )
        self.relayed = Counter("dvai_rendezvous_relayed_messages", "messages relayed between devices", registry=r)
        self.turn_minted = Counter(
            "dvai_rendezvous_turn_credentials_minted", "TURN credentials handed to devices", registry=r
        )
        self.relay_refused = Counter(
            "dvai_rendezvous_relay_refused", "relay messages refused, by reason", ["reason"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
