"""The scheduling rule of a model's queue: which waiting request goes next, across apps.

Pure bookkeeping (no asyncio, no clock): ``ModelQueue`` (``queue.py``) holds one
``FairOrder`` and asks it who is next whenever seats free up.

**Order: start-time fair queuing by app.** Each app (the authenticated app id of the
request; requests without one form their own class) has its own FIFO. A request gets a
start tag when it arrives: the larger of the *virtual time* (the tag of the request last
admitted) and the finish tag of its app's previous request (that request's tag plus its
seats). The waiting request with the smallest tag goes next; equal tags go in arrival order.
So an app that has many requests waiting has tags far ahead, and a request from an app
that has none waiting gets the current virtual time and goes before them: it waits for
the requests already running, not for another app's backlog. A request with ``n`` choices
costs ``n`` (its seats).

**A large request is not starved.** When the next request needs more seats than are
free, it is *reserved*: nothing else is admitted, whatever its tag, until enough seats
are free for it (as in a FIFO, where a large request at the head is not overtaken).

**The bounded waiting room is shared fairly (push-out).** When every waiting place is
taken, a request from an app holding fewer places than the app holding the most, by at
least two, takes that app's newest place (``victim``), whose request is then refused
(503 + ``Retry-After``) as if it had found the queue full; otherwise the arrival is
refused. One app alone can use every place; a flooding app cannot keep the places
another app needs.

Memory stays bounded: past ``_REMEMBERED_IDLE_APPS`` apps with nothing waiting, their
finish tags are forgotten (each such app loses at most its last request's cost).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["FairOrder"]

T = TypeVar("T")

_REMEMBERED_IDLE_APPS = 64
"""apps with nothing waiting whose last finish tag is kept (beyond that they are forgotten)."""


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    app: str
    seats: int
    tag: int
    seq: int
    evictable: bool


@dataclass(slots=True)
class FairOrder(Generic[T]):
    """Waiting requests of one model, by app; see the module docstring for the rule."""

    _queues: dict[str, collections.deque[_Entry[T]]] = field(default_factory=dict)
    _finish: dict[str, int] = field(default_factory=dict)
    """app → finish tag of its last request (kept while ahead of the virtual time)."""
    _virtual: int = 0
    _reserved: _Entry[T] | None = None
    _count: int = 0
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return self._count

    def waiting_of(self, app: str) -> int:
        """Requests of ``app`` waiting."""
        queue = self._queues.get(app)
        return len(queue) if queue else 0

    def charge(self, app: str, seats: int) -> None:
        """Account a request admitted at once (nobody was waiting), as if it had waited."""
        tag = self._start_tag(app)
        self._finish[app] = tag + seats
        self._advance(tag)

    def push(self, app: str, seats: int, item: T, *, evictable: bool = True) -> None:
        """``item`` waits for ``seats`` seats (``evictable=False``: never pushed out)."""
        tag = self._start_tag(app)
        self._finish[app] = tag + seats
        self._queues.setdefault(app, collections.deque()).append(
            _Entry(item, app, seats, tag, next(self._seq), evictable))
        self._count += 1

    def remove(self, app: str, item: T) -> bool:
        """Drop a waiting ``item`` (its client left); False when it was not waiting."""
        queue = self._queues.get(app)
        if not queue:
            return False
        for entry in queue:
            if entry.item is item:
                self._drop(entry)
                return True
        return False

    def pop_next(self, free: int) -> tuple[T, int] | None:
        """The request to admit with ``free`` seats free and its seats, taken out of the order;
        None when the next one does not fit (it is then reserved) or nobody waits."""
        entry = self._reserved or self._smallest()
        if entry is None:
            return None
        if entry.seats > free:
            self._reserved = entry
            return None
        self._drop(entry)
        self._advance(entry.tag)
        return entry.item, entry.seats

    def victim(self, app: str) -> T | None:
        """The queue is full and ``app`` asks to wait: the waiting request whose place it takes
        (taken out of the order), or None when ``app`` is to be refused."""
        mine = self.waiting_of(app)
        candidates = [queue for owner, queue in self._queues.items()
                      if owner != app and len(queue) >= mine + 2 and queue[-1].evictable
                      and queue[-1] is not self._reserved]
        if not candidates:
            return None
        fullest = max(candidates, key=lambda queue: (len(queue), queue[-1].seq))
        entry = fullest[-1]
        self._drop(entry)
        return entry.item

    # -- internals ----------------------------------------------------------------
    def _start_tag(self, app: str) -> int:
        return max(self._virtual, self._finish.get(app, 0))

    def _smallest(self) -> _Entry[T] | None:
        heads = [queue[0] for queue in self._queues.values()]
        return min(heads, key=lambda entry: (entry.tag, entry.seq)) if heads else None

    def _drop(self, entry: _Entry[T]) -> None:
        queue = self._queues[entry.app]
        queue.remove(entry)
        if not queue:
            del self._queues[entry.app]
        if self._reserved is entry:
            self._reserved = None
        self._count -= 1

    def _advance(self, tag: int) -> None:
        self._virtual = max(self._virtual, tag)
        if len(self._finish) > len(self._queues) + _REMEMBERED_IDLE_APPS:
            # Forget the apps with nothing waiting: each loses at most the cost of its last
            # request (its next one starts at the virtual time), and memory stays bounded.
            self._finish = {app: end for app, end in self._finish.items() if app in self._queues}
