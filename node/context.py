"""The composition root's product: every component of a running node, in one typed place.

Handlers read it from the app (``request.app[CONTEXT]``); the embeddable
``Node`` holds the same object, so HTTP and in-process calls share one path.
Optional components are ``None`` until the features that own them are enabled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .config import NodeConfig
from .engine.registry import ModelRegistry
from .identity import DeviceIdentity
from .inference import InferenceService


@dataclass(slots=True)
class NodeContext:
    config: NodeConfig
    identity: DeviceIdentity
    device_name: str
    registry: ModelRegistry
    inference: InferenceService
    started_at: float = field(default_factory=time.time)
    base_url: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    """Components added by optional features (discovery, pairing, audit, router, …)."""


CONTEXT = web.AppKey("dvai_context", NodeContext)
