"""Static peers: ``[[offload.known_peers]]`` from config, reached without discovery."""

from __future__ import annotations

from collections.abc import Sequence

from ..common.device_ids import is_valid_device_id
from ..common.errors import ConfigError
from ..config import KnownPeer
from ..constants import MAX_DEVICE_NAME_CHARS
from .model import PeerSeed
from .validate import clean_text, normalize_base_url


def seeds_from_known_peers(known_peers: Sequence[KnownPeer]) -> tuple[PeerSeed, ...]:
    """One health-checked seed per configured peer; a bad entry is a ``ConfigError``."""
    seeds: dict[str, PeerSeed] = {}
    for index, peer in enumerate(known_peers):
        key = f"offload.known_peers[{index}]"
        try:
            base_url = normalize_base_url(peer.base_url)
        except ValueError as exc:
            raise ConfigError(f"{key}.base_url: {exc}") from exc
        if peer.device_id is not None and not is_valid_device_id(peer.device_id):
            raise ConfigError(
                f"{key}.device_id: {peer.device_id!r} is not a device id (dv + 32 base32 characters; "
                f"`dvai-node peers` or GET /v1/dvai/health on that node shows it)"
            )
        seeds[base_url] = PeerSeed(
            base_url=base_url,
            source="static",
            device_id=peer.device_id,
            device_name=clean_text(peer.name, MAX_DEVICE_NAME_CHARS),
        )
    return tuple(seeds.values())
