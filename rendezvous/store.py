"""Storage for pairing sessions and registered devices.

``RendezvousStore`` is the small interface the service uses; ``SQLiteStore``
is the default. Every SQLite call runs on one dedicated thread (never on the
event loop), each write is one transaction, and the database is in WAL mode,
so a restart finds every session in flight and every registered device.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from node.fsutil import ensure_private_dir

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
    """The default store: one SQLite file (or ``:memory:``) used from a single worker thread."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rendezvous-sqlite")
        self._connection: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str) -> SQLiteStore:
        store = cls(path)
        await asyncio.get_running_loop().run_in_executor(store._executor, store._open)
        return store

    async def save_session(self, session: PairingSession) -> None:
        data = json.dumps(session.to_record(), separators=(",", ":"))
        await self._run(
            lambda db: _write(
                db,
                "INSERT OR REPLACE INTO sessions (id, expires_at, data) VALUES (?, ?, ?)",
                (session.id, session.expires_at, data),
            )
        )

    async def load_session(self, session_id: str) -> PairingSession | None:
        row = await self._run(
            lambda db: db.execute("SELECT data FROM sessions WHERE id = ?", (session_id,)).fetchone()
        )
        return None if row is None else PairingSession.from_record(json.loads(row[0]))

    async def count_sessions(self) -> int:
        return int(await self._run(lambda db: db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]))

    async def delete_sessions_expired_before(self, cutoff: float) -> int:
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
        if self._connection is not None:
            await self._run(lambda db: db.close())
            self._connection = None
        self._executor.shutdown(wait=True)

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


def _device(db: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
    row = db.execute(
        "SELECT device_id, public_key, first_seen, last_seen FROM devices WHERE device_id = ?", (device_id,)
    ).fetchone()
    return None if row is None else DeviceRecord(*row)
