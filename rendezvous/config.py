"""Rendezvous configuration: one frozen dataclass and its loader.

Sources, lowest to highest precedence: defaults, a TOML file, environment
variables (``DVAI_RENDEZVOUS_`` + the key in upper case), and command-line
flags. Unknown keys and bad values fail at start naming the key. Every limit
carries its unit and the reason it exists; ``docs/rendezvous.md`` lists them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from node.common.errors import ConfigError
from node.common.settings import build_dataclass, deep_merge, env_to_mapping, read_toml

ENV_PREFIX = "DVAI_RENDEZVOUS_"
DEFAULT_PORT = 38980
MEMORY_DB = ":memory:"


@dataclass(frozen=True, slots=True)
class RendezvousConfig:
    """Everything the rendezvous service reads at start."""

    host: str = "127.0.0.1"
    """bind address; loopback by default, put a TLS reverse proxy in front for the internet."""
    port: int = DEFAULT_PORT
    public_url: str | None = None
    """the URL clients use (it goes into QR codes and the WebSocket challenge); default http(s)://host:port."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    db: str | None = None
    """SQLite file; unset means ``rendezvous.sqlite3`` in the platform state dir, ``:memory:`` keeps nothing."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    session_ttl: float = 120.0
    """seconds a pairing session lives from creation; a pairing not finished by then fails."""
    session_retention: float = 60.0
    """seconds an ended session is kept after it expires so late polls still see how it ended."""
    sweep_interval: float = 15.0
    """seconds between sweeps that delete sessions past their retention."""
    session_cache: int = 10_000
    """recently used sessions kept in memory (about 1.5 KiB each) so long-polls skip SQLite."""
    max_sessions: int = 100_000
    """stored sessions; creation beyond this gets 503, bounding disk and memory a flood can force."""
    long_poll_max: float = 30.0
    """seconds an event long-poll may wait; under common proxy idle timeouts (60 s)."""
    max_waiters: int = 10_000
    """concurrent long-polls across all sessions; bounds the futures a flood can pin."""
    max_body_bytes: int = 16 * 1024
    """bytes per HTTP request body; pairing messages are far smaller."""
    max_confirmation_bytes: int = 4096
    """characters of one opaque key-confirmation message."""
    create_per_minute: float = 30.0
    """pairing sessions one client address may create per minute (burst the same)."""
    join_per_minute: float = 60.0
    """join attempts per client address per minute; guessing ids is also bounded by their 128 bits."""
    requests_per_minute: float = 1200.0
    """HTTP requests of any kind per client address per minute."""
    tracked_clients: int = 10_000
    """client addresses whose rate-limit buckets are remembered (least recently used are dropped)."""
    trust_forwarded_for: bool = False
    """take the client address from the last X-Forwarded-For hop (only behind your own proxy)."""
    ws_max_message_bytes: int = 64 * 1024
    """bytes of one relayed WebSocket message (the opaque ``data`` plus its envelope)."""
    ws_messages_per_second: float = 20.0
    """relayed messages one connection may send per second (burst ``ws_burst``)."""
    ws_burst: float = 40.0
    ws_auth_timeout: float = 10.0
    """seconds a new WebSocket has to answer the challenge before it is closed."""
    max_connections: int = 10_000
    """authenticated WebSocket connections at once."""
    turn_secret: str | None = None
    """coturn's ``static-auth-secret``: when set, authenticated devices may ask for time-limited TURN
    credentials (coturn's REST scheme) over the presence WebSocket. Keep it out of the TOML file:
    prefer ``DVAI_RENDEZVOUS_TURN_SECRET``."""
    turn_urls: tuple[str, ...] = ()
    """TURN URLs handed out with the credentials, e.g. ``turn:turn.example.org:3478?transport=udp``."""
    turn_ttl: float = 3600.0
    """seconds minted TURN credentials stay valid."""

    @property
    def base_url(self) -> str:
        """The URL put into QR codes and the WebSocket challenge's audience."""
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls_cert else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def public_url_warning(self) -> str | None:
        """A warning when QR codes would carry a URL other devices cannot reach (no ``public_url``)."""
        if self.public_url:
            return None
        host = self.host.strip("[]")
        if host in ("0.0.0.0", "::", "") or host == "localhost" or host.startswith("127.") or host == "::1":
            return (f"no public_url set: QR codes will carry {self.base_url}, which other devices cannot "
                    "reach; set --public-url (public_url, DVAI_RENDEZVOUS_PUBLIC_URL) to the URL clients use")
        return None

    def resolved_db(self) -> str:
        if self.db:
            return self.db if self.db == MEMORY_DB else str(Path(self.db).expanduser())
        from platformdirs import user_state_dir

        return str(Path(user_state_dir("dvai-rendezvous")) / "rendezvous.sqlite3")

    def replace(self, **changes: Any) -> RendezvousConfig:
        return dataclasses.replace(self, **changes)


def load_rendezvous_config(
    file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RendezvousConfig:
    """Build a ``RendezvousConfig``: defaults < TOML file < environment < ``overrides`` (flags)."""
    merged: dict[str, Any] = {}
    if file is not None:
        merged = deep_merge(merged, read_toml(file))
    merged = deep_merge(merged, env_to_mapping(os.environ if env is None else env, ENV_PREFIX))
    if overrides:
        merged = deep_merge(merged, {k: v for k, v in overrides.items() if v is not None})
    return config_from_mapping(merged)


def config_from_mapping(data: Mapping[str, Any]) -> RendezvousConfig:
    config = build_dataclass(RendezvousConfig, data)
    check_config(config)
    return config


def check_config(config: RendezvousConfig) -> None:
    """Cross-field checks a type alone cannot express."""
    if not 0 <= config.port < 65536:
        raise ConfigError("port: expected a port number (1-65535, or 0 for any free port)")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert and tls_key: set both or neither")
    if config.public_url is not None and not config.public_url.startswith(("http://", "https://")):
        raise ConfigError("public_url: expected an http:// or https:// URL")
    positive = (
        "session_ttl", "session_retention", "sweep_interval", "long_poll_max", "create_per_minute",
        "join_per_minute", "requests_per_minute", "ws_messages_per_second", "ws_burst", "ws_auth_timeout",
    )
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: expected a positive number")
    at_least_one = ("max_sessions", "session_cache", "max_waiters", "tracked_clients", "max_connections")
    for key in at_least_one:
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}: expected a positive integer")
    if config.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes: expected at least 1024")
    if not 256 <= config.max_confirmation_bytes <= config.max_body_bytes:
        raise ConfigError("max_confirmation_bytes: expected between 256 and max_body_bytes")
    if config.turn_secret is not None and (len(config.turn_secret) < 16 or not config.turn_urls):
        raise ConfigError("turn_secret: expected at least 16 characters, with turn_urls set")
    if not all(url.startswith(("turn:", "turns:")) for url in config.turn_urls):
        raise ConfigError("turn_urls: expected turn: or turns: URLs")
    if config.turn_ttl < 60:
        raise ConfigError("turn_ttl: expected at least 60 seconds")
    if config.ws_max_message_bytes < 1024:
        raise ConfigError("ws_max_message_bytes: expected at least 1024")
