"""``ModelQueue``: one model's bounded FIFO request queue.

One request runs at a time; up to ``limit`` more wait, and are admitted in
arrival order (``asyncio.Lock`` wakes its waiters first come, first served).
The next one is refused at once with ``QueueFullError`` (429, ``Retry-After``)
rather than queued without bound. A waiter whose client leaves is simply
dropped: its task is cancelled while it awaits the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..common.errors import QueueFullError
from ..constants import QUEUE_RETRY_AFTER


class ModelQueue:
    """Admission and FIFO order for the requests of one model."""

    def __init__(self, model_id: str, *, limit: int) -> None:
        self.model_id = model_id
        self.limit = limit
        """requests that may wait behind the running one (the model's ``queue_depth`` setting)."""
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._running = 0

    @property
    def waiting(self) -> int:
        """Requests admitted and waiting for their turn."""
        return self._waiting

    @property
    def depth(self) -> int:
        """Requests waiting plus the one running."""
        return self._waiting + self._running

    @property
    def busy(self) -> bool:
        """A request is running or waiting."""
        return self._lock.locked() or self._waiting > 0

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for this request's turn (or raise ``QueueFullError``), hold it while the body runs."""
        if self._lock.locked() and self._waiting >= self.limit:
            raise QueueFullError(
                f"model '{self.model_id}' has {self._waiting} requests waiting (queue_depth "
                f"{self.limit}); retry later",
                retry_after=QUEUE_RETRY_AFTER,
            )
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        self._running = 1
        try:
            yield
        finally:
            self._running = 0
            self._lock.release()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the model outside the admission limit, after the running request (to unload it)."""
        async with self._lock:
            yield
