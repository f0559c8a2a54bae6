"""Storage for pairing sessions and registered devices.

``RendezvousStore`` is the small interface the service uses; ``SQLiteStore``
is the default. Every SQLite call runs on one dedicated thread (never on the
event loop), each write is one transaction (session writes are group-committed),
and the database is in WAL mode, so a restart finds every session in flight and
every registered device.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from node.common.fsutil import ensure_private_dir

from .config import MEMORY_DB
from .sessions import PairingSession

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expires_at ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device that proved its id to this rendezvous at least once."""

    device_id: str
    public_key: str
    first_seen: float
    last_seen: float


class RendezvousStore(Protocol):
    async def save_session(self, session: PairingSession) -> None: ...

    async def load_session(self, session_id: str) -> PairingSession | None: ...

    async def count_sessions(self) -> int: ...

    async def delete_sessions_expired_before(self, cutoff: float) -> int: ...

    async def register_device(self, device_id: str, public_key: str, now: float) -> DeviceRecord: ...

    async def get_device(self, device_id: str) -> DeviceRecord | None: ...

    async def count_devices(self) -> int: ...

    async def close(self) -> None: ...


class SQLiteStore:
    """The default store: one SQLite file (or ``:memory:``) used from a single worker thread.

    Session writes are group-committed: saves that arrive while a commit runs are
    written together in the next transaction, and each ``save_session`` returns
    only once its row is committed. Recently used sessions are also kept in a
    bounded cache (filled after commit), so long-polls do not re-read SQLite.
    """

    def __init__(self, path: str, *, cache_size: int = 10_000) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rendezvous-sqlite")
        self._connection: sqlite3.Connection | None = None
        self._cache: OrderedDict[str, PairingSession] = OrderedDict()
        self._cache_size = cache_size
        self._pending: list[tuple[PairingSession, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str, *, cache_size: int = 10_000) -> SQLiteStore:
        store = cls(path, cache_size=cache_size)
        await store._start()
        return store

    async def save_session(self, session: PairingSession) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((session, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name="rendezvous-sqlite-writer")
        await future
        self._remember(session)

    async def load_session(self, session_id: str) -> PairingSession | None:
        cached = self._cache.get(session_id)
        if cached is not None:
            self._cache.move_to_end(session_id)
            return cached
        row = await self._run(
            lambda db: db.execute("SELECT data FROM sessions WHERE id = ?", (session_id,)).fetchone()
        )
        if row is None:
            return None
        session = PairingSession.from_record(json.loads(row[0]))
        self._remember(session)
        return session

    async def count_sessions(self) -> int:
        return int(await self._run(lambda db: db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]))

    async def delete_sessions_expired_before(self, cutoff: float) -> int:
        for session_id in [k for k, v in self._cache.items() if v.expires_at < cutoff]:
            del self._cache[session_id]
        return await self._run(
            lambda db: _write(db, "DELETE FROM sessions WHERE expires_at < ?", (cutoff,))
        )

    async def register_device(self, device_id: str, public_key: str, now: float) -> DeviceRecord:
        def register(db: sqlite3.Connection) -> DeviceRecord:
            _write(
                db,
                "INSERT INTO devices (device_id, public_key, first_seen, last_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen",
                (device_id, public_key, now, now),
            )
            record = _device(db, device_id)
            assert record is not None
            return record

        return await self._run(register)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        return await self._run(lambda db: _device(db, device_id))

    async def count_devices(self) -> int:
        return int(await self._run(lambda db: db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]))

    async def close(self) -> None:
        if self._writer is not None:
            with suppress(Exception):
                await self._writer  # let saves already accepted reach the disk
            self._writer = None
        if self._connection is not None:
            await self._run(lambda db: db.close())
            self._connection = None
        self._executor.shutdown(wait=True)
        self._cache.clear()

    # ----------------------------------------------------------------------

    async def _start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    async def _write_pending(self) -> None:
        """Commit everything queued, batch after batch, until the queue is empty."""
        while self._pending:
            batch, self._pending = self._pending, []
            rows = [
                (s.id, s.expires_at, json.dumps(s.to_record(), separators=(",", ":"))) for s, _ in batch
            ]
            try:
                await self._run(functools.partial(_write_many, rows=rows))
            except Exception as exc:  # noqa: BLE001 - handed to every waiting saver
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _remember(self, session: PairingSession) -> None:
        self._cache[session.id] = session
        self._cache.move_to_end(session.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # ----------------------------------------------------------------------

    def _open(self) -> None:
        if self._path != MEMORY_DB:
            ensure_private_dir(Path(self._path).parent)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        if self._path != MEMORY_DB:
            Path(self._path).chmod(0o600)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed write survives a process crash; only a power
            # loss may lose the last transactions, which for 2-minute sessions is acceptable.
            db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._connection = db

    async def _run(self, func: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, func)

    def _call(self, func: Callable[[sqlite3.Connection], T]) -> T:
        if self._connection is None:
            raise RuntimeError("the rendezvous store is closed")
        return func(self._connection)


def _write(db: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> int:
    """One statement in its own transaction: all of it is written, or none of it."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        cursor = db.execute(sql, params)
        return cursor.rowcount


def _write_many(db: sqlite3.Connection, rows: list[tuple[str, float, str]]) -> None:
    """Many session rows in one transaction: all of them are written, or none."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR REPLACE INTO sessions (id, expires_at, data) VALUES (?, ?, ?)", rows)


def _device(db: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
    row = db.execute(
        "SELECT device_id, public_key, first_seen, last_seen FROM devices WHERE device_id = ?", (device_id,)
    ).fetchone()
    return None if row is None else DeviceRecord(*row)
