"""The audit log: one row per inference request, in SQLite, written by one dedicated thread.

The event loop only enqueues (``record`` never blocks and never grows memory past
``AUDIT_QUEUE_MAX`` rows: beyond that rows are dropped and counted). The writer thread owns the
connection, commits rows in batches, runs queries in order with the writes (a query sees every
row recorded before it), and enforces retention by age and row count every
``AUDIT_PRUNE_INTERVAL_S`` seconds and whenever many rows arrived since the last pass.

``record_confirmed`` / ``record_durably`` report when the row is committed: the record
middleware (``node/api/record.py``) waits for it so that a request's row is on disk before its
answer leaves (WAL with ``synchronous=NORMAL``: a commit survives a
crash of the node process; an OS crash or power loss may still lose the last commits).

The writer survives bad rows and failing writes: every value is made storable first (text with
lone surrogates escaped, integers clamped to 64 bits), a batch that fails is retried row by row,
a row that still fails is dropped and counted, and ``health()`` reports the failures (shown by
``GET /v1/dvai/health`` and ``/metrics``). Requests never fail because of the audit log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from ..common.clock import MS_PER_DAY, unix_ms
from ..common.fsutil import SECRET_MODE, ensure_private_dir
from ..config import AuditConfig
from ..constants import (
    AUDIT_BATCH_MAX,
    AUDIT_FIELD_MAX_CHARS,
    AUDIT_PRUNE_INTERVAL_S,
    AUDIT_QUERY_MAX_ROWS,
    AUDIT_QUEUE_MAX,
)

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    peer_device_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    model_requested TEXT,
    model_served TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_ms REAL,
    served_by TEXT NOT NULL,
    error_code TEXT
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
"""

_T = TypeVar("_T")


class AuditLogError(RuntimeError):
    """The audit database cannot be opened (corrupt, unwritable)."""


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One inference request. ``peer_device_id`` is a device id, ``self`` or ``anonymous``;
    ``served_by`` is ``local`` or the device id of the peer that ran it."""

    ts: int
    """unix ms when the request arrived."""
    request_id: str
    app_id: str
    peer_device_id: str
    endpoint: str
    status: int
    model_requested: str | None = None
    model_served: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    served_by: str = "local"
    error_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``GET /v1/dvai/audit`` item shape (camelCase, like the rest of the mesh plane)."""
        return {
            "ts": self.ts,
            "requestId": self.request_id,
            "appId": self.app_id,
            "peerDeviceId": self.peer_device_id,
            "endpoint": self.endpoint,
            "status": self.status,
            "modelRequested": self.model_requested,
            "modelServed": self.model_served,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "latencyMs": self.latency_ms,
            "servedBy": self.served_by,
            "errorCode": self.error_code,
        }


_COLUMNS = tuple(f.name for f in fields(AuditRow))
_INSERT = f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_STOP = object()


@dataclass(frozen=True, slots=True)
class _Job:
    run: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future[Any]


class AuditLog:
    """``await AuditLog.open(state_dir, config.audit)`` … ``record(row)`` … ``await close()``."""

    def __init__(
        self,
        path: Path,
        *,
        retention_days: float = 30.0,
        max_rows: int = 100_000,
        enabled: bool = True,
        now_ms: Callable[[], int] = unix_ms,
        prune_interval_s: float = AUDIT_PRUNE_INTERVAL_S,
        queue_max: int = AUDIT_QUEUE_MAX,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.enabled = enabled
        self.dropped = 0
        """rows refused because the queue was full (or the log was closed)."""
        self.write_errors = 0
        """rows that could not be written (bad values, or a database error), since start."""
        self.last_error: str | None = None
        self.last_error_at: int | None = None
        self._failing = False
        """the last write attempt failed (cleared by the next successful commit)."""
        self._now_ms = now_ms
        self._prune_interval_s = prune_interval_s
        self._queue_max = queue_max
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    async def open(cls, state_dir: Path, config: AuditConfig, **options: Any) -> AuditLog:
        """Open (creating, mode 0600) ``<state_dir>/audit.sqlite3`` and start the writer."""
        log = cls(Path(state_dir) / AUDIT_FILE, retention_days=config.retention_days,
                  max_rows=config.max_rows, enabled=config.enabled, **options)
        await log.start()
        return log

    async def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="dvai-audit-writer",
                                        daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise

    def record(self, row: AuditRow) -> bool:
        """Queue a row for the writer thread; never blocks. False when it was dropped."""
        return self._enqueue(row)

    def record_confirmed(self, row: AuditRow) -> concurrent.futures.Future[bool] | None:
        """Queue a row like ``record``; the future says (True) once it is committed, or that it
        could not be written (False). None when the row was dropped at once. Never blocks."""
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        return future if self._enqueue(_DurableRow(row, future)) else None

    async def record_durably(self, row: AuditRow, *, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
        """Queue a row and wait (at most ``timeout`` s) until it is committed; never raises.

        True once the row is in the database; False when it was dropped, failed or is late
        (then it may still be written; the failure is counted in ``health()``).
        """
        return await wait_committed(self.record_confirmed(row), timeout)

    def health(self) -> dict[str, Any]:
        """``state``: ``ok``, ``failing`` (the last write failed), ``stopped`` (no writer) or ``disabled``."""
        if not self.enabled:
            state = "disabled"
        elif self._thread is None or not self._thread.is_alive() or self._closed:
            state = "stopped"
        else:
            state = "failing" if self._failing else "ok"
        return {"state": state, "writeErrors": self.write_errors, "droppedRows": self.dropped,
                "lastError": self.last_error, "lastErrorAt": self.last_error_at}

    def _enqueue(self, item: AuditRow | _DurableRow) -> bool:
        if not self.enabled:
            return False
        if self._closed or self._thread is None or self._queue.qsize() >= self._queue_max:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                logger.warning("audit log dropped %d row(s): writer %s", self.dropped,
                               "closed" if self._closed or self._thread is None else "backlogged")
            return False
        self._queue.put(item)
        return True

    async def query(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        app_id: str | None = None,
        peer: str | None = None,
        status: int | None = None,
        limit: int = 100,
    ) -> list[AuditRow]:
        """Rows newest first; ``since``/``until`` are unix ms (``since`` ≤ ts < ``until``)."""
        clauses: list[str] = []
        params: list[object] = []
        for sql, value in (("ts >= ?", since), ("ts < ?", until), ("app_id = ?", app_id),
                           ("peer_device_id = ?", peer), ("status = ?", status)):
            if value is not None:
                clauses.append(sql)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        limit = max(1, min(int(limit), AUDIT_QUERY_MAX_ROWS))
        sql = f"SELECT {', '.join(_COLUMNS)} FROM audit {where} ORDER BY ts DESC, id DESC LIMIT ?"

        def run(conn: sqlite3.Connection) -> list[AuditRow]:
            return [AuditRow(*values) for values in conn.execute(sql, (*params, limit))]

        rows: list[AuditRow] = await self._submit(run, default=[])
        return rows

    async def prune(self) -> int:
        """Apply retention now; returns the number of rows deleted."""
        deleted: int = await self._submit(self._prune, default=0)
        return deleted

    async def flush(self) -> None:
        """Wait until every row recorded so far is committed."""
        await self._submit(lambda conn: None, default=None)

    async def close(self) -> None:
        """Commit what is queued, stop the writer thread and close the database."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._thread = None

    # -- the writer thread ---------------------------------------------------

    async def _submit(self, run: Callable[[sqlite3.Connection], _T], *, default: _T) -> _T:
        if not self.enabled:
            return default
        if self._closed or self._thread is None:
            raise AuditLogError("the audit log is closed")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Job(run, future))
        result: _T = await asyncio.wrap_future(future)
        return result

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._connect()
        except Exception as exc:  # noqa: BLE001 - reported to start()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        next_prune = time.monotonic()
        since_prune = 0
        batch: list[object] = []
        try:
            while True:
                batch = self._next_batch(max(0.0, next_prune - time.monotonic()))
                written, stop = self._process(conn, batch)
                since_prune += written
                if time.monotonic() >= next_prune or since_prune >= max(1000, self.max_rows // 10):
                    self._prune_logged(conn)
                    next_prune = time.monotonic() + self._prune_interval_s
                    since_prune = 0
                if stop:
                    return
        except Exception:  # noqa: BLE001 - logged; the thread ends, callers get an error
            # The writer is gone: fail whoever waits on it instead of letting them hang.
            logger.exception("the audit log writer stopped")
            self._closed = True
            self._fail_queued(batch, AuditLogError("the audit log writer stopped; see the node log"))
        finally:
            conn.close()

    def _fail_queued(self, taken: list[object], error: Exception) -> None:
        """Fail every job still waiting: the ones in the batch being written and the queued ones."""
        pending = list(taken)
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in pending:
            if isinstance(item, _Job) and not item.future.done():
                item.future.set_exception(error)

    def _next_batch(self, timeout: float) -> list[object]:
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < AUDIT_BATCH_MAX:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _process(self, conn: sqlite3.Connection, batch: list[object]) -> tuple[int, bool]:
        """Write rows in one transaction; run jobs in order after the rows before them."""
        rows: list[AuditRow | _DurableRow] = []
        written = 0
        for item in batch:
            if isinstance(item, (AuditRow, _DurableRow)):
                rows.append(item)
                continue
            written += self._write(conn, rows)
            rows = []
            if item is _STOP:
                return written, True
            if isinstance(item, _Job):
                try:
                    item.future.set_result(item.run(conn))
                except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                    item.future.set_exception(exc)
        return written + self._write(conn, rows), False

    def _write(self, conn: sqlite3.Connection, items: list[AuditRow | _DurableRow]) -> int:
        """Commit ``items`` in one transaction; if that fails, one by one, dropping (and
        counting) only the rows that fail alone. Settles every durable row's future."""
        if not items:
            return 0
        try:
            with conn:
                conn.executemany(_INSERT, [_row_values(_row_of(item)) for item in items])
            ok = [True] * len(items)
        except Exception as exc:  # noqa: BLE001 - a bad row or a database error must not stop the writer
            if len(items) > 1:
                logger.warning("audit log: a batch of %d rows failed (%s); writing them one by one",
                               len(items), exc)
            ok = [self._write_one(conn, item) for item in items]
        else:
            self._failing = False
        for item, done in zip(items, ok, strict=True):
            if isinstance(item, _DurableRow) and not item.future.done():
                item.future.set_result(done)
        written = sum(ok)
        if written and self._on_commit is not None:
            try:
                self._on_commit(written)
            except Exception:  # noqa: BLE001 - an observer must not kill the writer
                logger.exception("audit log: on_commit observer failed")
        return written

    def _write_one(self, conn: sqlite3.Connection, item: AuditRow | _DurableRow) -> bool:
        try:
            with conn:
                conn.execute(_INSERT, _row_values(_row_of(item)))
        except Exception as exc:  # noqa: BLE001 - counted, logged, reported by health()
            self.write_errors += 1
            self._failing = True
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            self.last_error_at = self._now_ms()
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                logger.error("audit log: could not write a row (%s); %d row(s) lost so far",
                             self.last_error, self.write_errors)
            return False
        self._failing = False
        return True

    def _prune(self, conn: sqlite3.Connection) -> int:
        cutoff = self._now_ms() - int(self.retention_days * MS_PER_DAY)
        with conn:
            deleted = conn.execute("DELETE FROM audit WHERE ts < ?", (cutoff,)).rowcount
            deleted += conn.execute(
                "DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.max_rows,),
            ).rowcount
        return deleted

    def _prune_logged(self, conn: sqlite3.Connection) -> None:
        try:
            self._prune(conn)
        except Exception:  # noqa: BLE001 - retention is retried at the next pass
            logger.exception("audit log: retention pass failed")

    def _connect(self) -> sqlite3.Connection:
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, SECRET_MODE)
        os.close(fd)
        os.chmod(self.path, SECRET_MODE)  # also tightens a file created by an older version
        try:
            conn = sqlite3.connect(self.path)  # implicit transactions: `with conn` commits a batch
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                conn.execute("SELECT count(*) FROM audit").fetchone()
            except BaseException:
                conn.close()
                raise
        except sqlite3.DatabaseError as exc:
            raise AuditLogError(f"{self.path} is not a usable audit database ({exc}); move it aside "
                                "to start a new one") from exc
        return conn


async def wait_committed(future: concurrent.futures.Future[bool] | None, timeout: float) -> bool:  # noqa: ASYNC109
    """Wait (at most ``timeout`` s) for a ``record_confirmed`` future; False when dropped, failed
    or late. Never raises (cancellation aside)."""
    if future is None:
        return False
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
    except TimeoutError:
        logger.warning("audit log: a row took more than %.1f s to commit", timeout)
        return False


@dataclass(frozen=True, slots=True)
class _DurableRow:
    row: AuditRow
    future: concurrent.futures.Future[bool]


def _row_of(item: AuditRow | _DurableRow) -> AuditRow:
    return item.row if isinstance(item, _DurableRow) else item


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_REQUIRED_TEXT = frozenset({"request_id", "app_id", "peer_device_id", "endpoint", "served_by"})
_INTEGER_COLUMNS = frozenset({"ts", "status", "prompt_tokens", "completion_tokens"})


def _row_values(row: AuditRow) -> tuple[Any, ...]:
    """The row as SQLite can store it, whatever a caller put in it (see ``_storable``)."""
    return tuple(_storable(name, getattr(row, name)) for name in _COLUMNS)


def _storable(name: str, value: Any) -> Any:
    """Integers within 64 bits in the integer columns, a finite float in ``latency_ms``, text
    clipped and valid UTF-8 (lone surrogates escaped as ``\\udxxx``) elsewhere; a value of
    the wrong type becomes NULL (or text: ``repr``)."""
    if name in _INTEGER_COLUMNS:
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return min(max(value, _INT64_MIN), _INT64_MAX)
    if name == "latency_ms":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return None
    if value is None:
        return "" if name in _REQUIRED_TEXT else None
    text = value if isinstance(value, str) else repr(value)
    text = text[:AUDIT_FIELD_MAX_CHARS]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
