"""dvai-mesh node: an OpenAI-compatible inference node that offloads to faster paired peers."""

from __future__ import annotations

from .config import KnownPeer, ModelConfig, NodeConfig, OffloadConfig, load_config
from .errors import DVAIError
from .runtime import Node
from .security.signing import (
    compose_signed_message,
    new_nonce,
    path_with_query_of,
    sign_hmac,
    sign_request_headers,
    verify_hmac,
)
from .version import __version__

__all__ = [
    "DVAIError",
    "KnownPeer",
    "ModelConfig",
    "Node",
    "NodeConfig",
    "OffloadConfig",
    "__version__",
    "compose_signed_message",
    "load_config",
    "new_nonce",
    "path_with_query_of",
    "sign_hmac",
    "sign_request_headers",
    "verify_hmac",
]
