"""Checks for what other devices tell us: URLs, names, model lists, capability claims.

Pure functions. Each ``clean_*`` drops what it cannot believe and appends a short
reason to ``problems`` so the caller can log it once per source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

from yarl import URL

from ..constants import (
    MAX_CLAIMED_QUEUE_DEPTH,
    MAX_CLAIMED_TOK_PER_S,
    MAX_MODEL_ID_CHARS,
    MAX_PEER_MODELS,
    MAX_URL_CHARS,
)

Via = Literal["mdns", "static", "rendezvous", "custom"]
VIA_VALUES: tuple[Via, ...] = ("mdns", "static", "rendezvous", "custom")



def normalize_base_url(value: object) -> str:
    """A peer's OpenAI base URL, ``scheme://host:port[/prefix]/v1``; raises ``ValueError``.

    ``http://10.0.0.5:38883`` and ``http://10.0.0.5:38883/v1/`` both become
    ``http://10.0.0.5:38883/v1``. Credentials, queries and fragments are refused.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_URL_CHARS:
        raise ValueError("base URL must be a non-empty string of at most 2048 characters")
    try:
        url = URL(value.strip())
        port = url.port
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a URL: {value!r}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"base URL must be http:// or https:// with a host: {value!r}")
    if url.user or url.password or url.query_string or url.fragment:
        raise ValueError(f"base URL must not carry credentials, a query or a fragment: {value!r}")
    if port is None or not 0 < port < 65536:
        raise ValueError(f"base URL has no valid port: {value!r}")
    path = url.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return str(URL.build(scheme=url.scheme, host=url.host, port=port, path=path))


def base_url_for(host: str, port: int, api_path: str = "/v1", *, secure: bool = False) -> str:
    """The base URL of a peer seen at ``host:port`` (IPv6 hosts get brackets)."""
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    scheme = "https" if secure else "http"
    return normalize_base_url(str(URL.build(scheme=scheme, host=host, port=port, path=api_path or "/")))


def health_url(base_url: str) -> str:
    """``<base_url>/dvai/health``; ``base_url`` is normalized, so this is ``…/v1/dvai/health``."""
    return base_url + "/dvai/health"


def address_of(base_url: str) -> str:
    """``host:port`` of a base URL (``[v6]:port`` for IPv6)."""
    url = URL(base_url)
    host = url.host or ""
    return f"[{host}]:{url.port}" if ":" in host else f"{host}:{url.port}"


def clean_text(value: object, max_chars: int) -> str:
    """Printable characters only, stripped, cut to ``max_chars``; '' for non-strings."""
    if not isinstance(value, str):
        return ""
    text = "".join(ch for ch in value[: max_chars * 4] if ch.isprintable())
    return text.strip()[:max_chars]


def is_valid_model_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_MODEL_ID_CHARS
        and value.isprintable()
        and not any(ch.isspace() or ch == "," for ch in value)
    )


def clean_models(values: Iterable[object], problems: list[str]) -> tuple[str, ...]:
    """Valid, distinct model ids, at most ``MAX_PEER_MODELS``."""
    out: list[str] = []
    for index, value in enumerate(values):
        if index >= MAX_PEER_MODELS * 4 or len(out) >= MAX_PEER_MODELS:
            problems.append(f"more than {MAX_PEER_MODELS} models; extra ones dropped")
            break
        if not is_valid_model_id(value):
            problems.append(f"bad model id {str(value)[:40]!r} dropped")
        elif value not in out:
            out.append(str(value))
    return tuple(out)


def clean_tok_per_s(model_id: str, value: object, problems: list[str]) -> float | None:
    """A believable decode rate, or None (with a problem noted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        problems.append(f"capability for {model_id!r} is not a number")
        return None
    try:
        rate = float(value)
    except ValueError:
        problems.append(f"capability for {model_id!r} is not a number")
        return None
    if not math.isfinite(rate) or rate < 0 or rate > MAX_CLAIMED_TOK_PER_S:
        problems.append(f"absurd capability claim {str(value)[:20]!r} tok/s for {model_id!r} ignored")
        return None
    return rate


def clean_capability(values: Mapping[object, object], problems: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for model_id, value in list(values.items())[: MAX_PEER_MODELS * 4]:
        if not is_valid_model_id(model_id):
            problems.append(f"capability for bad model id {str(model_id)[:40]!r} dropped")
            continue
        if len(out) >= MAX_PEER_MODELS:
            problems.append(f"capability for more than {MAX_PEER_MODELS} models; extra ones dropped")
            break
        rate = clean_tok_per_s(str(model_id), value, problems)
        if rate is not None:
            out[str(model_id)] = rate
    return out


def clean_queue_depth_value(model_id: str, value: object, problems: list[str]) -> int | None:
    if isinstance(value, bool):
        value = None
    try:
        depth = int(value) if isinstance(value, (int, str)) else None
    except ValueError:
        depth = None
    if depth is None or not 0 <= depth <= MAX_CLAIMED_QUEUE_DEPTH:
        problems.append(f"bad queue depth {str(value)[:20]!r} for {model_id!r} ignored")
        return None
    return depth
