"""Wait for SIGINT/SIGTERM on the running loop: how both services' commands run until stopped."""

from __future__ import annotations

import asyncio
import signal
from contextlib import suppress

__all__ = ["wait_for_stop_signal"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def wait_for_stop_signal(stop: asyncio.Event | None = None) -> None:
    """Return on SIGINT or SIGTERM (or when ``stop`` is set); the handlers are removed after.

    Where the loop cannot install handlers (not the main thread, Windows), only ``stop`` ends it.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    installed = []
    for sig in _STOP_SIGNALS:
        with suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
