"""``ModelQueue``: one model's sequence seats and its bounded FIFO request queue.

The model has ``seats`` sequence seats (its ``parallel`` setting; 1 for an
engine that cannot batch). A request takes one seat per choice; requests that
find too few free seats wait and are admitted in arrival order (a large request
at the head is not overtaken by smaller ones behind it). At most ``limit``
requests wait; the next one is refused at once with ``QueueFullError``
(``Retry-After``) rather than queued without bound. A waiter whose client
leaves is simply dropped: its task is cancelled while it waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from ..common.errors import QueueFullError
from ..constants import QUEUE_RETRY_AFTER


class ModelQueue:
    """Admission, seats and FIFO order for the requests of one model."""

    def __init__(self, model_id: str, *, limit: int, seats: int = 1) -> None:
        if seats < 1:
            raise ValueError("a model has at least one seat")
        self.model_id = model_id
        self.limit = limit
        """requests that may wait while the seats are taken (the model's ``queue_depth`` setting)."""
        self.seats = seats
        self._free = seats
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._running = 0

    @property
    def waiting(self) -> int:
        """Requests admitted and waiting for their turn."""
        return len(self._waiters)

    @property
    def running(self) -> int:
        """Requests holding seats."""
        return self._running

    @property
    def seats_taken(self) -> int:
        return self.seats - self._free

    @property
    def depth(self) -> int:
        """Requests waiting plus those running."""
        return len(self._waiters) + self._running

    @property
    def busy(self) -> bool:
        """A request is running or waiting."""
        return self._running > 0 or bool(self._waiters)

    @contextlib.asynccontextmanager
    async def turn(self, seats: int = 1, *, bounded: bool = True) -> AsyncIterator[None]:
        """Wait for ``seats`` free seats in arrival order (or raise ``QueueFullError``); hold them
        while the body runs."""
        if not 1 <= seats <= self.seats:
            raise ValueError(f"a request may take 1 to {self.seats} seats, not {seats}")
        if self._waiters or self._free < seats:
            if bounded and len(self._waiters) >= self.limit:
                raise QueueFullError(
                    f"model '{self.model_id}' has {len(self._waiters)} requests waiting (queue_depth "
                    f"{self.limit}); retry later",
                    retry_after=QUEUE_RETRY_AFTER,
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (seats, waiter)
            self._waiters.append(entry)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release(seats)  # the seats were granted just as the waiter left
                else:
                    with contextlib.suppress(ValueError):  # _wake may have dropped it already
                        self._waiters.remove(entry)
                    self._wake()  # a smaller request behind it may fit now
                raise
        else:
            self._free -= seats
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            self._release(seats)

    def _release(self, seats: int) -> None:
        self._free += seats
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._free:
            seats, waiter = self._waiters.popleft()
            if waiter.done():  # cancelled, not yet removed by its task
                continue
            self._free -= seats
            waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold every seat, after the running requests and outside the admission limit (to unload
        the model)."""
        async with self.turn(self.seats, bounded=False):
            yield
