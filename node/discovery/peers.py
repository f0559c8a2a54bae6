"""The peer table: every device this node knows of, merged from all discovery sources.

``PeerTable`` is plain in-memory state driven by calls (``observe``, ``health_ok``,
``health_failed``, ``withdraw``, ``sweep``); the rules are the pure functions in
``merge.py``. It is used from the event loop thread only (not thread-safe). Time comes
from the injected ``now`` (unix ms), so tests drive it with plain numbers.

Readers: ``snapshot()``, ``get(device_id)``, ``reachable()``; ``subscribe(callback)`` for
change callbacks, ``watch()`` for an async iterator of changes, ``wait_for(predicate)``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from ..common.clock import unix_ms
from ..config import OffloadConfig
from ..constants import MAX_PEER_ADDRESSES, MAX_PEER_WATCH_QUEUE, MAX_PEERS, MAX_PENDING_PEERS
from .merge import (
    MergeOutcome,
    PeerEntry,
    apply_claim,
    apply_health_failure,
    apply_health_ok,
    apply_timeouts,
    to_peer,
    withdraw_source,
)
from .model import HealthReport, Peer, PeerClaim, PeerState
from .validate import VIA_VALUES, Via

__all__ = [
    "HealthReport",
    "MergeOutcome",
    "Peer",
    "PeerChange",
    "PeerChangeKind",
    "PeerClaim",
    "PeerState",
    "PeerTable",
    "PeerWatch",
    "Via",
    "VIA_VALUES",
]

_log = logging.getLogger(__name__)


class PeerChangeKind(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class PeerChange:
    kind: PeerChangeKind
    peer: Peer
    """the peer after the change (before it, for ``removed``)."""


PeerListener = Callable[[PeerChange], None]


class PeerTable:
    """Bounded map device id → peer, with change notification."""

    def __init__(
        self,
        *,
        self_device_id: str | None = None,
        now: Callable[[], int] = unix_ms,
        unreachable_after: float = 3.0,
        remove_after: float = 60.0,
        max_peers: int = MAX_PEERS,
        max_pending: int = MAX_PENDING_PEERS,
        max_alternates: int = MAX_PEER_ADDRESSES,
    ) -> None:
        self.self_device_id = self_device_id
        self._now = now
        self._unreachable_after_ms = int(unreachable_after * 1000)
        self._remove_after_ms = int(remove_after * 1000)
        self._max_peers = max_peers
        self._max_pending = min(max_pending, max_peers)
        self._max_alternates = max_alternates
        self._entries: dict[str, PeerEntry] = {}
        self._remote: dict[str, Peer] = {}
        """rendezvous peers (``via = "rendezvous"``), reached over WebRTC links: kept apart from the
        address-based entries, whose merge rules are about LAN addresses."""
        self._listeners: list[PeerListener] = []

    @classmethod
    def from_config(
        cls, config: OffloadConfig, *, self_device_id: str | None, now: Callable[[], int] = unix_ms
    ) -> PeerTable:
        """A table with ``config``'s ``unreachable_after`` / ``remove_after`` timing."""
        return cls(
            self_device_id=self_device_id,
            now=now,
            unreachable_after=config.unreachable_after,
            remove_after=config.remove_after,
        )

    # -- readers -----------------------------------------------------------

    def get(self, device_id: str) -> Peer | None:
        """The device's peer: its LAN entry, or its rendezvous entry when the LAN one is not
        reachable and the rendezvous one is (a peer reachable both ways uses the LAN)."""
        entry = self._entries.get(device_id)
        lan = to_peer(entry) if entry is not None else None
        remote = self._remote.get(device_id)
        if remote is not None and (lan is None or (not lan.reachable and remote.reachable)):
            return remote
        return lan

    def snapshot(self) -> tuple[Peer, ...]:
        """Every listed peer (all states), sorted by device name then id."""
        ids = set(self._entries) | set(self._remote)
        peers = [peer for peer in (self.get(device_id) for device_id in ids) if peer is not None]
        return tuple(sorted(peers, key=lambda p: (p.device_name.lower(), p.device_id)))

    def remote(self, device_id: str) -> Peer | None:
        """The device's rendezvous entry, whether or not a LAN entry is preferred."""
        return self._remote.get(device_id)

    def reachable(self) -> tuple[Peer, ...]:
        return tuple(p for p in self.snapshot() if p.state is PeerState.REACHABLE)

    def entry(self, device_id: str) -> PeerEntry | None:
        """The raw row (anchor, candidate, alternates): for diagnostics and tests."""
        return self._entries.get(device_id)

    def health_targets(self) -> tuple[tuple[str, str], ...]:
        """(device id, base URL) pairs a health checker should probe: anchors and candidates."""
        targets: list[tuple[str, str]] = []
        for entry in self._entries.values():
            targets.append((entry.device_id, entry.base_url))
            if entry.candidate is not None:
                targets.append((entry.device_id, entry.candidate.base_url))
        return tuple(targets)

    def owner_of(self, base_url: str) -> str | None:
        """The device id whose anchor, candidate or alternate address is ``base_url``."""
        for entry in self._entries.values():
            if base_url == entry.base_url or base_url in entry.alternates:
                return entry.device_id
            if entry.candidate is not None and entry.candidate.base_url == base_url:
                return entry.device_id
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._entries

    # -- writers -----------------------------------------------------------

    def observe(self, claim: PeerClaim) -> MergeOutcome:
        """Merge one source's claim about a device."""
        if claim.device_id == self.self_device_id:
            return MergeOutcome.SELF
        entry = self._entries.get(claim.device_id)
        if entry is None and not self._make_room(pending=True):
            return MergeOutcome.TABLE_FULL
        updated, outcome = apply_claim(entry, claim, self._now())
        self._store(entry, updated)
        return outcome

    def health_ok(self, device_id: str, base_url: str, report: HealthReport) -> MergeOutcome:
        entry = self._entries.get(device_id)
        if entry is None:
            return MergeOutcome.IGNORED
        updated, outcome = apply_health_ok(
            entry, base_url, report, self._now(), max_alternates=self._max_alternates
        )
        self._store(entry, updated)
        return outcome

    def health_failed(self, device_id: str, base_url: str) -> MergeOutcome:
        entry = self._entries.get(device_id)
        if entry is None:
            return MergeOutcome.IGNORED
        updated, outcome = apply_health_failure(
            entry, base_url, self._now(), max_alternates=self._max_alternates
        )
        self._store(entry, updated)
        return outcome

    def withdraw(self, device_id: str, source: Via) -> bool:
        """``source`` no longer reports the device; True when the entry was removed."""
        entry = self._entries.get(device_id)
        if entry is None:
            return False
        updated = withdraw_source(entry, source)
        self._store(entry, updated)
        return updated is None

    def set_remote(self, peers: Iterable[Peer]) -> None:
        """Replace the rendezvous peers (``via = "rendezvous"``) with ``peers``; listeners hear
        of every change as for LAN peers."""
        new = {peer.device_id: peer for peer in peers if peer.device_id != self.self_device_id}
        old = self._remote
        self._remote = new
        for device_id in old.keys() - new.keys():
            self._notify(PeerChange(PeerChangeKind.REMOVED, old[device_id]))
        for device_id, peer in new.items():
            before = old.get(device_id)
            if before is None:
                self._notify(PeerChange(PeerChangeKind.ADDED, peer))
            elif dataclasses.replace(before, last_seen_at=0) != dataclasses.replace(peer, last_seen_at=0):
                self._notify(PeerChange(PeerChangeKind.UPDATED, peer))

    def sweep(self) -> None:
        """Apply the unreachable / remove timeouts to every entry."""
        now = self._now()
        for entry in list(self._entries.values()):
            updated = apply_timeouts(
                entry, now,
                unreachable_after_ms=self._unreachable_after_ms,
                remove_after_ms=self._remove_after_ms,
            )
            if updated != entry:
                self._store(entry, updated)

    def mark_unreachable(self, device_id: str) -> bool:
        """Mark a peer unreachable now (e.g. a forwarded request failed to connect)."""
        entry = self._entries.get(device_id)
        if entry is None:
            return False
        self._store(entry, dataclasses.replace(entry, state=PeerState.UNREACHABLE, anchor_ok=False))
        return True

    def remove(self, device_id: str) -> bool:
        entry = self._entries.get(device_id)
        if entry is None:
            return False
        self._store(entry, None)
        return True

    # -- change notification -----------------------------------------------

    def subscribe(self, listener: PeerListener) -> Callable[[], None]:
        """Call ``listener(change)`` after every change; returns the unsubscribe function.

        Listeners run synchronously on the loop thread and must not block; an exception
        in one is logged and does not affect the table or other listeners.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def watch(self, *, max_queue: int = MAX_PEER_WATCH_QUEUE) -> PeerWatch:
        """An async iterator of changes (``async with table.watch() as changes: …``)."""
        return PeerWatch(self, max_queue)

    async def wait_for(self, predicate: Callable[[PeerTable], bool], within: float) -> bool:
        """Wait up to ``within`` seconds until ``predicate(table)`` holds; False if it never did."""
        changed = asyncio.Event()
        unsubscribe = self.subscribe(lambda _change: changed.set())
        try:
            async with asyncio.timeout(within):
                while not predicate(self):
                    await changed.wait()
                    changed.clear()
            return True
        except TimeoutError:
            return predicate(self)
        finally:
            unsubscribe()

    # -- internals -----------------------------------------------------------

    def _store(self, before: PeerEntry | None, after: PeerEntry | None) -> None:
        if after is None:
            if before is not None:
                del self._entries[before.device_id]
                self._notify(PeerChange(PeerChangeKind.REMOVED, to_peer(before)))
            return
        self._entries[after.device_id] = after
        if before is None:
            self._notify(PeerChange(PeerChangeKind.ADDED, to_peer(after)))
            return
        old, new = to_peer(before), to_peer(after)
        # lastSeenAt moves with every health answer; that alone is not worth a notification.
        if dataclasses.replace(old, last_seen_at=0) != dataclasses.replace(new, last_seen_at=0):
            self._notify(PeerChange(PeerChangeKind.UPDATED, new))

    def _make_room(self, *, pending: bool) -> bool:
        """Evict so one more (unconfirmed) entry fits; False when nothing may be evicted."""
        if pending:
            unconfirmed = [e for e in self._entries.values() if not e.confirmed]
            if len(unconfirmed) >= self._max_pending:
                self._store(min(unconfirmed, key=lambda e: e.first_seen_at), None)
        if len(self._entries) < self._max_peers:
            return True
        evictable = [
            e for e in self._entries.values()
            if not e.confirmed or e.state in (PeerState.UNREACHABLE, PeerState.FLAGGED)
        ]
        if not evictable:
            return False
        self._store(min(evictable, key=lambda e: e.last_seen_at), None)
        return True

    def _notify(self, change: PeerChange) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # noqa: BLE001 - a broken listener must not break the table
                _log.exception("peer table listener failed")


class PeerWatch:
    """Bounded async iterator over ``PeerChange`` events; the oldest are dropped when full."""

    def __init__(self, table: PeerTable, max_queue: int) -> None:
        self._queue: collections.deque[PeerChange] = collections.deque(maxlen=max_queue)
        self._event = asyncio.Event()
        self._closed = False
        self._unsubscribe = table.subscribe(self._on_change)

    def _on_change(self, change: PeerChange) -> None:
        self._queue.append(change)
        self._event.set()

    def close(self) -> None:
        self._closed = True
        self._unsubscribe()
        self._event.set()

    async def __aenter__(self) -> PeerWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[PeerChange]:
        return self

    async def __anext__(self) -> PeerChange:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        return self._queue.popleft()
