"""Who uses the hub: apps and devices, from the pairings, the API keys and the usage rows.

Pure functions over plain data (the admin endpoints ``GET /v1/dvai/apps`` and
``GET /v1/dvai/devices`` call them with the stores' contents):

- an **app** is any app id that holds an inbound pairing on some device, an API key, or a
  usage row in the window asked for;
- a **device** is any peer device with a pairing (inbound, per app, or outbound), or a usage
  row (``apikey:<id>`` for API-key callers, ``self`` for loopback callers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import QuotaConfig
from ..pairing.store import Pairing
from .keys import ApiKey

__all__ = ["apps_json", "devices_json", "quota_rules_json"]


@dataclass(slots=True)
class _Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, row: Mapping[str, Any]) -> None:
        self.requests += int(row.get("requests") or 0)
        self.prompt_tokens += int(row.get("promptTokens") or 0)
        self.completion_tokens += int(row.get("completionTokens") or 0)

    def to_json(self) -> dict[str, int]:
        return {"requests": self.requests, "promptTokens": self.prompt_tokens,
                "completionTokens": self.completion_tokens}


@dataclass(slots=True)
class _App:
    devices: set[str] = field(default_factory=set)
    """devices with an inbound pairing for the app."""
    seen_on: set[str] = field(default_factory=set)
    """devices (or ``apikey:<id>``) the app's requests came from, in the usage window."""
    keys: list[ApiKey] = field(default_factory=list)
    usage: _Totals = field(default_factory=_Totals)


def apps_json(pairings: Iterable[Pairing], keys: Iterable[ApiKey], usage_rows: Iterable[Mapping[str, Any]],
              *, now_ms: int) -> list[dict[str, Any]]:
    """One entry per app id, sorted: paired devices, API keys (active ones counted), usage."""
    apps: dict[str, _App] = {}
    for pairing in pairings:
        if pairing.may_call_us and pairing.peer_app_id is not None:
            apps.setdefault(pairing.peer_app_id, _App()).devices.add(pairing.peer_device_id)
    for key in keys:
        apps.setdefault(key.app_id, _App()).keys.append(key)
    for row in usage_rows:
        app = apps.setdefault(str(row.get("appId")), _App())
        app.usage.add(row)
        app.seen_on.add(str(row.get("deviceId")))
    return [{
        "appId": app_id,
        "pairedDevices": sorted(app.devices),
        "activeKeys": sorted(k.id for k in app.keys if k.usable(now_ms)),
        "keys": len(app.keys),
        "seenOn": sorted(app.seen_on),
        "usage": app.usage.to_json(),
    } for app_id, app in sorted(apps.items())]


@dataclass(slots=True)
class _Device:
    name: str | None = None
    apps: list[Pairing] = field(default_factory=list)
    outbound: Pairing | None = None
    used_by: set[str] = field(default_factory=set)
    usage: _Totals = field(default_factory=_Totals)


def devices_json(pairings: Iterable[Pairing], usage_rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per device, sorted: each app paired on it (its own key and approval), whether
    this node may call it, the apps seen in its usage rows and its totals."""
    devices: dict[str, _Device] = {}
    for pairing in pairings:
        device = devices.setdefault(pairing.peer_device_id, _Device())
        device.name = pairing.peer_device_name
        if pairing.may_call_us:
            device.apps.append(pairing)
        if pairing.may_call_peer:
            device.outbound = pairing
    for row in usage_rows:
        device = devices.setdefault(str(row.get("deviceId")), _Device())
        device.used_by.add(str(row.get("appId")))
        device.usage.add(row)
    return [{
        "deviceId": device_id,
        "deviceName": device.name,
        "apps": [{"appId": p.peer_app_id, "role": p.role, "via": p.via, "pairedAt": p.paired_at, "admin": p.admin}
                 for p in sorted(device.apps, key=lambda p: p.peer_app_id or "")],
        "outbound": device.outbound is not None,
        "seenApps": sorted(device.used_by),
        "usage": device.usage.to_json(),
    } for device_id, device in sorted(devices.items())]


def quota_rules_json(rules: Iterable[QuotaConfig]) -> list[dict[str, Any]]:
    """The configured ``[[hub.quotas]]`` rules (or hub mode's defaults), as the API shows them."""
    return [{"appId": r.app_id, "deviceId": r.device_id, "model": r.model,
             "requestsPerMinute": r.requests_per_minute, "tokensPerDay": r.tokens_per_day,
             "concurrent": r.concurrent} for r in rules]
