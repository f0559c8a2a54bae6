"""Typed errors of managed mode, one per failure, each with a stable ``.code``.

The codes are the reference provider's ``QvacManagedErrorCode`` in Python
naming; the JavaScript provider in ``clients/ai-sdk`` uses the same strings.
"""

from __future__ import annotations

from enum import StrEnum


class ManagedErrorCode(StrEnum):
    UNKNOWN_MODEL = "unknown_model"
    DUPLICATE_MODEL = "duplicate_model"
    MULTIPLE_DEFAULT_MODELS = "multiple_default_models"
    BINARY_NOT_FOUND = "binary_not_found"
    SERVE_START_TIMEOUT = "serve_start_timeout"
    SERVE_SPAWN_FAILED = "serve_spawn_failed"
    SERVE_EXITED = "serve_exited"
    PORT_ALLOCATION_FAILED = "port_allocation_failed"


class ManagedModeError(Exception):
    """Base of every managed-mode failure; ``code`` says which."""

    code: ManagedErrorCode

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownManagedModelError(ManagedModeError, LookupError):
    code = ManagedErrorCode.UNKNOWN_MODEL


class DuplicateManagedModelError(ManagedModeError, ValueError):
    code = ManagedErrorCode.DUPLICATE_MODEL


class MultipleDefaultManagedModelsError(ManagedModeError, ValueError):
    code = ManagedErrorCode.MULTIPLE_DEFAULT_MODELS


class BinaryNotFoundError(ManagedModeError, FileNotFoundError):
    """The ``dvai-node`` executable (the reference's CLI) cannot be found."""

    code = ManagedErrorCode.BINARY_NOT_FOUND


class ServeStartTimeoutError(ManagedModeError, TimeoutError):
    code = ManagedErrorCode.SERVE_START_TIMEOUT


class ServeSpawnFailedError(ManagedModeError, OSError):
    code = ManagedErrorCode.SERVE_SPAWN_FAILED


class ServeExitedError(ManagedModeError):
    """The serve exited before it became healthy; ``output`` is the tail of its log."""

    code = ManagedErrorCode.SERVE_EXITED

    def __init__(self, message: str, *, exit_code: int | None = None, output: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.output = output


class PortAllocationFailedError(ManagedModeError, OSError):
    code = ManagedErrorCode.PORT_ALLOCATION_FAILED


ERRORS_BY_CODE: dict[str, type[ManagedModeError]] = {
    cls.code.value: cls
    for cls in (
        UnknownManagedModelError, DuplicateManagedModelError, MultipleDefaultManagedModelsError,
        BinaryNotFoundError, ServeStartTimeoutError, ServeSpawnFailedError, ServeExitedError,
        PortAllocationFailedError,
    )
}
