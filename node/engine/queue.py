"""``ModelQueue``: one model's sequence seats and its bounded, fair request queue.

The model has ``seats`` sequence seats (its ``parallel`` setting; 1 for an
engine that cannot batch). A request takes one seat per choice; requests that
find too few free seats wait. Who goes next is decided fairly across apps
(``fairness.FairOrder``: start-time fair queuing by app, each app's requests in
arrival order; a large request that is next is not overtaken by smaller ones
while it waits for seats). At most ``limit`` requests wait; past that an arrival
is refused at once with ``QueueFullError`` (``Retry-After``) rather than queued
without bound — unless another app holds more of the waiting places than it
would, by two or more, in which case that app's newest waiter is refused
instead (push-out). A waiter whose client leaves is simply dropped: its task is
cancelled while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..common.errors import QueueFullError
from ..constants import QUEUE_RETRY_AFTER
from .fairness import FairOrder

NO_APP = ""
"""the scheduling class of requests without an app (an unauthenticated local caller)."""
_EXCLUSIVE = "\x00exclusive"
"""the class of ``exclusive()`` turns (unloading the model); never pushed out."""


class ModelQueue:
    """Admission, seats and fair order for the requests of one model."""

    def __init__(self, model_id: str, *, limit: int, seats: int = 1) -> None:
        if seats < 1:
            raise ValueError("a model has at least one seat")
        self.model_id = model_id
        self.limit = limit
        """requests that may wait while the seats are taken (the model's ``queue_depth`` setting)."""
        self.seats = seats
        self._free = seats
        self._order: FairOrder[asyncio.Future[None]] = FairOrder()
        self._running = 0

    @property
    def waiting(self) -> int:
        """Requests admitted and waiting for their turn."""
        return len(self._order)

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
        return len(self._order) + self._running

    @property
    def busy(self) -> bool:
        """A request is running or waiting."""
        return self._running > 0 or bool(self._order)

    @contextlib.asynccontextmanager
    async def turn(self, seats: int = 1, *, app: str = NO_APP, bounded: bool = True) -> AsyncIterator[None]:
        """Wait for ``seats`` free seats in ``app``'s fair turn (or raise ``QueueFullError``); hold
        them while the body runs."""
        if not 1 <= seats <= self.seats:
            raise ValueError(f"a request may take 1 to {self.seats} seats, not {seats}")
        if self._order or self._free < seats:
            if bounded and len(self._order) >= self.limit:
                pushed_out = self._order.victim(app)
                if pushed_out is None:
                    raise self._full()
                if not pushed_out.done():
                    pushed_out.set_exception(self._full())
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._order.push(app, seats, waiter, evictable=bounded)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._release(seats)  # the seats were granted just as the waiter left
                else:
                    self._order.remove(app, waiter)  # _wake may have dropped it already
                    self._wake()  # a smaller request behind it may fit now
                raise
        else:
            self._order.charge(app, seats)
            self._free -= seats
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            self._release(seats)

    def _full(self) -> QueueFullError:
        return QueueFullError(
            f"model '{self.model_id}' has {len(self._order)} requests waiting (queue_depth "
            f"{self.limit}); retry later",
            retry_after=QUEUE_RETRY_AFTER,
        )

    def _release(self, seats: int) -> None:
        self._free += seats
        self._wake()

    def _wake(self) -> None:
        while (admitted := self._order.pop_next(self._free)) is not None:
            waiter, seats = admitted
            if waiter.done():  # cancelled or pushed out, not yet removed by its task
                continue
            self._free -= seats
            waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold every seat, after the running requests and outside the admission limit (to unload
        the model)."""
        async with self.turn(self.seats, app=_EXCLUSIVE, bounded=False):
            yield
