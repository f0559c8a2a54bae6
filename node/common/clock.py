"""The one wall clock for timestamps that leave the process or are stored: unix milliseconds.

Stored and wire timestamps are integers in unix ms, and their names say so (``*_ms``, or a
docstring "unix ms" where the wire name is fixed, such as ``pairedAt``). Durations and
deadlines inside one process use ``time.monotonic()`` seconds instead, which never jumps.
The rendezvous's session state machine and its SQLite columns keep float unix seconds (its
injected clock); they become ms at the wire through ``ms_from_seconds``.
"""

from __future__ import annotations

import time

__all__ = ["MS_PER_DAY", "ms_from_seconds", "unix_ms"]

MS_PER_DAY = 86_400_000


def unix_ms() -> int:
    """Milliseconds since the unix epoch (integer arithmetic: no float rounding)."""
    return time.time_ns() // 1_000_000


def ms_from_seconds(seconds: float) -> int:
    """A float unix-seconds time (an injected ``time.time``-style clock) as integer unix ms."""
    return int(seconds * 1000)
