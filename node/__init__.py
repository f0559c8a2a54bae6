"""dvai-mesh node: an OpenAI-compatible inference node that offloads to faster paired peers.

The public names below load on first use (PEP 562), so ``import node.common.errors`` (or the
rendezvous) does not pull in the runtime, the engine or discovery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .common.errors import DVAIError
    from .config import KnownPeer, ModelConfig, NodeConfig, OffloadConfig, load_config
    from .managed import ManagedModel, managed_node
    from .runtime import Node
    from .security.signing import (
        compose_signed_message,
        new_nonce,
        path_with_query_of,
        sign_hmac,
        sign_request_headers,
        verify_hmac,
    )

_LAZY = {
    "DVAIError": ".common.errors",
    "KnownPeer": ".config",
    "ModelConfig": ".config",
    "NodeConfig": ".config",
    "OffloadConfig": ".config",
    "load_config": ".config",
    "Node": ".runtime",
    "ManagedModel": ".managed",
    "managed_node": ".managed",
    "compose_signed_message": ".security.signing",
    "new_nonce": ".security.signing",
    "path_with_query_of": ".security.signing",
    "sign_hmac": ".security.signing",
    "sign_request_headers": ".security.signing",
    "verify_hmac": ".security.signing",
}

__all__ = [
    "DVAIError",
    "KnownPeer",
    "ManagedModel",
    "ModelConfig",
    "Node",
    "NodeConfig",
    "OffloadConfig",
    "__version__",
    "compose_signed_message",
    "load_config",
    "managed_node",
    "new_nonce",
    "path_with_query_of",
    "sign_hmac",
    "sign_request_headers",
    "verify_hmac",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'node' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
