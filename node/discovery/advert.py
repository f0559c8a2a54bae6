"""What a node advertises over mDNS, and the TXT record codec (pure).

TXT keys (RFC 6763 §6: ``key=value`` strings, each at most 255 bytes):

====  ========================================================================
v     TXT format version (``1``)
id    device id (``dv`` + 32 base32 chars)
n     device name
ver   dvai-mesh version of the node
p     OpenAI API path prefix (``/v1``)
tls   ``1`` when the API is served over HTTPS, else ``0``
in    instance id: random per process start (tells copies of one identity apart)
app   app id (optional)
m     loaded model ids, comma-separated (as many as fit in 255 bytes)
c     decode tok/s per model in ``m``, same order, empty when unknown (advisory)
q     queue depth per model in ``m``, same order
cc    capability curve per model in ``m``, same order (``1:33.1/2:45/4:58.2``: aggregate
      tok/s by concurrency; empty for a one-point curve); only when it fits (advisory)
mx    ``1`` when ``m`` had to be cut short; ``GET /v1/dvai/health`` has the full list
====  ========================================================================
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..capability.curve import Curve, decode_curve_text, encode_curve_text
from ..common.device_ids import is_valid_device_id
from ..constants import (
    MAX_API_PATH_CHARS,
    MAX_DEVICE_NAME_CHARS,
    MAX_INSTANCE_ID_CHARS,
    MAX_TXT_BYTES,
    MAX_TXT_ITEM_BYTES,
    MAX_TXT_ITEMS,
    MAX_VERSION_CHARS,
    MDNS_TXT_FORMAT_VERSION,
)
from ..identity import NodeIdentity
from ..version import __version__
from .model import PeerClaim
from .validate import (
    base_url_for,
    clean_models,
    clean_queue_depth_value,
    clean_text,
    clean_tok_per_s,
)


@dataclass(frozen=True, slots=True)
class AdvertisedInfo:
    """What the app tells discovery about this node (``advertised_info_provider()``)."""

    port: int
    """TCP port of the node's HTTP API."""
    api_path: str = "/v1"
    secure: bool = False
    loaded_models: tuple[str, ...] = ()
    capability: Mapping[str, float] = field(default_factory=dict)
    """model id → measured decode tok/s."""
    queue_depth: Mapping[str, int] = field(default_factory=dict)
    """model id → requests waiting."""
    capability_curve: Mapping[str, Curve] = field(default_factory=dict)
    """model id → aggregate tok/s by concurrency (the ``cc`` key, when it fits)."""
    app_id: str | None = None
    addresses: tuple[str, ...] = ()
    """IP addresses to advertise; empty: those of the discovery interfaces (all if unset)."""
    version: str = __version__


def encode_txt(identity: NodeIdentity, info: AdvertisedInfo) -> dict[str, str]:
    """The TXT properties for ``info``; always within RFC 6763 size limits."""
    txt = {
        "v": MDNS_TXT_FORMAT_VERSION,
        "id": identity.device_id,
        "n": _fit(clean_text(identity.device_name, MAX_DEVICE_NAME_CHARS), "n"),
        "ver": clean_text(info.version, MAX_VERSION_CHARS),
        "p": info.api_path if _is_api_path(info.api_path) else "/v1",
        "tls": "1" if info.secure else "0",
        "in": identity.instance_id[:MAX_INSTANCE_ID_CHARS],
    }
    if info.app_id:
        txt["app"] = _fit(clean_text(info.app_id, 128), "app")
    rows = []
    for model_id in clean_models(info.loaded_models, []):
        rate = info.capability.get(model_id)
        believable = rate is not None and clean_tok_per_s(model_id, rate, []) is not None
        depth = info.queue_depth.get(model_id, 0)
        rows.append((model_id, f"{rate:.4g}" if believable else "", str(max(0, int(depth)))))
    txt.update(_model_lists(rows, MAX_TXT_BYTES - _size(txt) - 8))
    curves = [info.capability_curve.get(model_id, ()) for model_id in _split(txt.get("m", ""))]
    if any(len(curve) > 1 for curve in curves):
        value = ",".join(encode_curve_text(curve) if len(curve) > 1 else "" for curve in curves)
        if len(f"cc={value}".encode()) <= MAX_TXT_ITEM_BYTES and _size({**txt, "cc": value}) <= MAX_TXT_BYTES:
            txt["cc"] = value  # else left out: peers then assume no gain from concurrency
    return txt


def decode_txt(raw: bytes) -> dict[str, str]:
    """Parse a raw TXT rdata into ``{key: value}``; raises ``ValueError`` when malformed.

    Keys are case-insensitive (lower-cased); the first occurrence of a key wins
    (RFC 6763 §6.4). Items without ``=`` are boolean attributes, kept with value ''.
    """
    if len(raw) > MAX_TXT_BYTES:
        raise ValueError(f"TXT record of {len(raw)} bytes (limit {MAX_TXT_BYTES})")
    out: dict[str, str] = {}
    offset = items = 0
    while offset < len(raw):
        length = raw[offset]
        item = raw[offset + 1 : offset + 1 + length]
        if len(item) != length:
            raise ValueError("TXT string runs past the end of the record")
        offset += 1 + length
        items += 1
        if items > MAX_TXT_ITEMS:
            raise ValueError(f"more than {MAX_TXT_ITEMS} TXT strings")
        if not item:
            continue
        key_bytes, _, value_bytes = item.partition(b"=")
        try:
            key, value = key_bytes.decode("ascii").lower(), value_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("TXT string is not valid text") from exc
        if key and key not in out:
            out[key] = value
    return out


def claim_from_txt(
    txt: Mapping[str, str], host: str, port: int, problems: list[str]
) -> PeerClaim:
    """The claim an mDNS record makes; raises ``ValueError`` when the record is unusable.

    Recoverable problems (a bad model id, an absurd capability) drop that value and are
    appended to ``problems``.
    """
    device_id = txt.get("id", "")
    if not is_valid_device_id(device_id):
        raise ValueError(f"TXT 'id' is not a device id: {device_id[:40]!r}")
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    api_path = txt.get("p") or "/v1"
    if not _is_api_path(api_path):
        raise ValueError(f"TXT 'p' is not an API path: {api_path[:40]!r}")
    secure = txt.get("tls") == "1"
    models = clean_models(_split(txt.get("m", "")), problems)
    rates, depths = _split(txt.get("c", "")), _split(txt.get("q", ""))
    capability: dict[str, float] = {}
    queue_depth: dict[str, int] = {}
    if len(rates) not in (0, len(models)) or len(depths) not in (0, len(models)):
        problems.append("TXT 'c'/'q' lists do not match 'm'; capability and queue ignored")
        rates, depths = [], []
    for model_id, rate_text in zip(models, rates, strict=False):
        rate = clean_tok_per_s(model_id, rate_text, problems) if rate_text else None
        if rate is not None:
            capability[model_id] = rate
    for model_id, depth_text in zip(models, depths, strict=False):
        depth = clean_queue_depth_value(model_id, depth_text, problems)
        if depth is not None:
            queue_depth[model_id] = depth
    curve_texts = _split(txt.get("cc", ""))
    curves: dict[str, Curve] = {}
    if len(curve_texts) not in (0, len(models)):
        problems.append("TXT 'cc' list does not match 'm'; capability curves ignored")
        curve_texts = []
    for model_id, curve_text in zip(models, curve_texts, strict=False):
        curve = decode_curve_text(curve_text) if curve_text else ()
        if curve_text and not curve:
            problems.append(f"unusable capability curve {curve_text[:40]!r} for {model_id!r} ignored")
        elif len(curve) > 1:
            curves[model_id] = curve
    instance_id = clean_text(txt.get("in", ""), MAX_INSTANCE_ID_CHARS) or None
    return PeerClaim(
        device_id=device_id,
        base_url=base_url_for(host, port, api_path, secure=secure),
        source="mdns",
        device_name=clean_text(txt.get("n", ""), MAX_DEVICE_NAME_CHARS),
        dvai_version=clean_text(txt.get("ver", ""), MAX_VERSION_CHARS),
        app_id=clean_text(txt.get("app", ""), 128) or None,
        loaded_models=models,
        capability=capability,
        queue_depth=queue_depth,
        instance_id=instance_id,
        capability_curve=curves,
    )


def pick_address(addresses: Sequence[str]) -> str | None:
    """The address to reach a peer at: IPv4 first, then global IPv6, loopback last."""

    def rank(text: str) -> int:
        address = ipaddress.ip_address(text.split("%")[0])
        if address.is_loopback:
            return 4 if address.version == 4 else 5
        if address.is_link_local:
            return 3 if address.version == 4 else 9  # v6 link-local needs a scope id: avoid
        return 0 if address.version == 4 else 1

    usable = []
    for text in addresses:
        try:
            usable.append((rank(text), text))
        except ValueError:
            continue
    usable = [item for item in usable if item[0] < 9]
    return min(usable)[1] if usable else None


def _model_lists(rows: Sequence[tuple[str, str, str]], budget: int) -> dict[str, str]:
    """``m``/``c``/``q`` for as many leading rows as fit; ``mx=1`` when some were left out."""
    for count in range(len(rows), 0, -1):
        lists = {key: ",".join(row[i] for row in rows[:count]) for i, key in enumerate("mcq")}
        items = [f"{key}={value}".encode() for key, value in lists.items()]
        if all(len(item) <= MAX_TXT_ITEM_BYTES for item in items) and sum(
            1 + len(item) for item in items
        ) <= budget:
            return {**lists, "mx": "1"} if count < len(rows) else lists
    return {"mx": "1"} if rows else {}


def _split(text: str) -> list[str]:
    return text.split(",") if text else []


def _is_api_path(path: str) -> bool:
    return (
        0 < len(path) <= MAX_API_PATH_CHARS
        and path.startswith("/")
        and all(ch.isalnum() or ch in "/-_.~" for ch in path)
    )


def _fit(value: str, key: str) -> str:
    """Cut ``value`` so ``key=value`` fits one TXT string (UTF-8 safe)."""
    budget = MAX_TXT_ITEM_BYTES - len(key) - 1
    encoded = value.encode()
    return value if len(encoded) <= budget else encoded[:budget].decode(errors="ignore")


def _size(txt: Mapping[str, str]) -> int:
    return sum(1 + len(f"{k}={v}".encode()) for k, v in txt.items())
