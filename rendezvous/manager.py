"""``SessionManager``: the pure session rules plus storage and long-poll wake-ups.

Transitions of one session are serialized by a per-session lock (this service
is one process) and saved before they are answered or announced, so a restart
never loses a step a client was told about.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from node.common.b64 import b64url_encode
from node.common.errors import ServiceUnavailableError

from . import sessions as rules
from .sessions import PairingSession, Role
from .store import RendezvousStore

Clock = Callable[[], float]
RandomBytes = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class SessionLimits:
    ttl: float = 120.0
    retention: float = 60.0
    max_sessions: int = 100_000
    max_waiters: int = 10_000
    max_waiters_per_session: int = 4
    """long-polls one session may hold; two parties need one each, the rest is slack for retries."""


class SessionManager:
    def __init__(
        self,
        *,
        store: RendezvousStore,
        limits: SessionLimits,
        clock: Clock = time.time,
        random_bytes: RandomBytes = os.urandom,
        on_change: Callable[[PairingSession], None] | None = None,
    ) -> None:
        self._store = store
        self._limits = limits
        self._clock = clock
        self._random = random_bytes
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._waiter_count = 0
        self._session_count: int | None = None
        self._on_change = on_change
        self._closing = False

    @property
    def limits(self) -> SessionLimits:
        return self._limits

    async def create(self, initiator_public_key: str) -> tuple[PairingSession, str]:
        """A new session and the initiator's token (returned once, stored only as a hash)."""
        if self._session_count is None:
            self._session_count = await self._store.count_sessions()
        if self._session_count >= self._limits.max_sessions:
            raise ServiceUnavailableError("too many pairing sessions in flight; try again soon", retry_after=10)
        token = self._new_token()
        session = rules.create_session(
            session_id=rules.new_session_id(self._random(rules.SESSION_ID_BYTES)),
            initiator_public_key=initiator_public_key,
            initiator_token=token,
            now=self._clock(),
            ttl=self._limits.ttl,
        )
        self._session_count += 1  # reserved before the await, so concurrent creates respect the cap
        try:
            await self._store.save_session(session)
        except BaseException:
            self._session_count -= 1
            raise
        self._changed(session)
        return session, token

    async def join(self, session_id: str, scanner_public_key: str, scanner_device_id: str) -> tuple[PairingSession, str]:
        async with self._locked(session_id):
            session = await self._load(session_id)
            token = self._new_token()
            updated, error = rules.join(
                session,
                scanner_public_key=scanner_public_key,
                scanner_device_id=scanner_device_id,
                scanner_token=token,
                now=self._clock(),
            )
            await self._save_if_changed(session, updated)
        self._changed(updated)
        if error is not None:
            raise error
        return updated, token

    async def confirm(self, session_id: str, token: str | None, message: str) -> PairingSession:
        return await self._transition(
            session_id, token, lambda s, role, now: rules.confirm(s, role=role, message=message, now=now)
        )

    async def finish(self, session_id: str, token: str | None, message: str) -> PairingSession:
        return await self._transition(
            session_id, token, lambda s, role, now: rules.finish(s, role=role, message=message, now=now)
        )

    async def abort(self, session_id: str, token: str | None, reason: str) -> PairingSession:
        return await self._transition(
            session_id, token, lambda s, role, now: rules.abort(s, role=role, reason=reason, now=now)
        )

    async def events(
        self, session_id: str, token: str | None, *, after: int, wait: float
    ) -> tuple[PairingSession, Role]:
        """The session once it has an event after ``after``, it ends, or ``wait`` seconds pass."""
        deadline = self._clock() + wait
        while True:
            waiter = self._add_waiter(session_id) if wait > 0 else None
            try:
                session = rules.refresh(await self._load(session_id), self._clock())
                role = rules.role_for_token(session, token)
                remaining = min(deadline, session.expires_at + 0.05) - self._clock()
                done = session.last_seq > after or session.state.ended or self._closing
                if done or remaining <= 0 or waiter is None:
                    return session, role
                with suppress(TimeoutError):
                    await asyncio.wait_for(waiter, remaining)
            finally:
                if waiter is not None:
                    self._remove_waiter(session_id, waiter)

    async def sweep(self) -> int:
        """Delete sessions past expiry plus retention; returns how many."""
        deleted = await self._store.delete_sessions_expired_before(self._clock() - self._limits.retention)
        self._session_count = await self._store.count_sessions()
        return deleted

    def shut_down(self) -> None:
        """Answer every long-poll now and every later one at once, so a restart is not held up."""
        self._closing = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # ----------------------------------------------------------------------

    async def _transition(
        self,
        session_id: str,
        token: str | None,
        step: Callable[[PairingSession, Role, float], PairingSession],
    ) -> PairingSession:
        async with self._locked(session_id):
            session = await self._load(session_id)
            role = rules.role_for_token(session, token)
            now = self._clock()
            try:
                updated = step(session, role, now)
            except Exception:
                await self._save_if_changed(session, rules.refresh(session, now))
                raise
            await self._save_if_changed(session, updated)
        self._changed(updated)
        return updated

    @asynccontextmanager
    async def _locked(self, session_id: str) -> AsyncIterator[None]:
        """Serialize transitions of one session; the lock is dropped when nobody holds or waits for it."""
        lock, users = self._locks.get(session_id, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            _, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)

    async def _load(self, session_id: str) -> PairingSession:
        if not rules.is_valid_session_id(session_id):
            raise rules.unknown_session()
        session = await self._store.load_session(session_id)
        if session is None:
            raise rules.unknown_session()
        return session

    async def _save_if_changed(self, before: PairingSession, after: PairingSession) -> None:
        if after is not before:
            await self._store.save_session(after)

    def _new_token(self) -> str:
        return b64url_encode(self._random(rules.TOKEN_BYTES))

    def _changed(self, session: PairingSession) -> None:
        for waiter in self._waiters.get(session.id, ()):
            if not waiter.done():
                waiter.set_result(None)
        if self._on_change is not None:
            self._on_change(session)

    def _add_waiter(self, session_id: str) -> asyncio.Future[None]:
        waiters = self._waiters.get(session_id, set())
        if self._waiter_count >= self._limits.max_waiters:
            raise ServiceUnavailableError("too many waiting clients; try again soon", retry_after=2)
        if len(waiters) >= self._limits.max_waiters_per_session:
            raise ServiceUnavailableError("too many waiting clients on this session", retry_after=2)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.add(future)
        self._waiters[session_id] = waiters
        self._waiter_count += 1
        return future

    def _remove_waiter(self, session_id: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(session_id)
        if waiters is None or waiter not in waiters:
            return
        waiters.discard(waiter)
        self._waiter_count -= 1
        if not waiters:
            del self._waiters[session_id]
