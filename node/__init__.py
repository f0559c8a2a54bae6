"""dvai-mesh node: an OpenAI-compatible inference node that offloads to faster paired peers."""

from __future__ import annotations

from .config import KnownPeer, ModelConfig, NodeConfig, OffloadConfig, load_config
from .errors import DVAIError
from .runtime import Node
from .version import __version__

__all__ = [
    "DVAIError",
    "KnownPeer",
    "ModelConfig",
    "Node",
    "NodeConfig",
    "OffloadConfig",
    "__version__",
    "load_config",
]
