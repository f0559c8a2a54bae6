"""Managed mode: a shared, self-cleaning ``dvai-node serve`` spawned (or reused) on demand.

``managed_node([...])`` resolves a serve for a model list: it joins a live serve with the
same reuse key or spawns one on a free port, and a detached supervisor reaps it once no
consumer process is left for the idle timeout. See docs/managed.md.
"""

from __future__ import annotations

from .errors import (
    BinaryNotFoundError,
    DuplicateManagedModelError,
    ManagedErrorCode,
    ManagedModeError,
    MultipleDefaultManagedModelsError,
    PortAllocationFailedError,
    ServeExitedError,
    ServeSpawnFailedError,
    ServeStartTimeoutError,
    UnknownManagedModelError,
)
from .handle import ManagedNode, ManagedNodeContext, managed_node
from .options import ManagedModel, ManagedOptions

__all__ = [
    "BinaryNotFoundError",
    "DuplicateManagedModelError",
    "ManagedErrorCode",
    "ManagedModeError",
    "ManagedModel",
    "ManagedNode",
    "ManagedNodeContext",
    "ManagedOptions",
    "MultipleDefaultManagedModelsError",
    "PortAllocationFailedError",
    "ServeExitedError",
    "ServeSpawnFailedError",
    "ServeStartTimeoutError",
    "UnknownManagedModelError",
    "managed_node",
]
