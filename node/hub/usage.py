"""Usage accounting per (UTC day, app, device, model): requests and tokens, kept in SQLite.

Today's totals live in memory too (quota checks read them on the event loop without I/O);
every answered request is written through one writer thread, so a restart resumes today's
totals from the file. Rows older than ``retention_days`` are deleted at start and once a day.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..common.fsutil import ensure_private_dir
from ..constants import USAGE_LABEL_MAX_CHARS
from ..engine.record import RequestRecord
from .quotas import QuotaSubject

__all__ = ["USAGE_FILE", "UsageStore", "utc_day"]

log = logging.getLogger(__name__)

USAGE_FILE = "usage.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    app_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, app_id, device_id, model)
)
"""
_UPSERT = """
INSERT INTO usage (day, app_id, device_id, model, requests, prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, 1, ?, ?)
ON CONFLICT (day, app_id, device_id, model) DO UPDATE SET
    requests = requests + 1,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


class UsageStore:
    def __init__(self, path: Path, *, retention_days: int = 90, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._retention_days = retention_days
        self._clock = clock
        self._today = utc_day(clock())
        self._totals: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-writer")
        self._db: sqlite3.Connection | None = None

    @classmethod
    def open(cls, state_dir: Path, **kwargs: Any) -> UsageStore:
        """Open (blocking: call off the event loop) and load today's totals."""
        ensure_private_dir(state_dir)
        store = cls(state_dir / USAGE_FILE, **kwargs)
        store._writer.submit(store._open).result()
        return store

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self.path.chmod(0o600)
        self._db.execute(_SCHEMA)
        self._prune()
        rows = self._db.execute("SELECT app_id, device_id, model, prompt_tokens + completion_tokens FROM usage "
                                "WHERE day = ?", (self._today,)).fetchall()
        with self._lock:
            self._totals = {(a, d, m): int(t) for a, d, m, t in rows}

    def _prune(self) -> None:
        assert self._db is not None
        oldest = utc_day(self._clock() - self._retention_days * 86400)
        self._db.execute("DELETE FROM usage WHERE day < ?", (oldest,))
        self._db.commit()

    # -- counting (the record reader) -------------------------------------------------
    def record(self, record: RequestRecord) -> None:
        """Count an answered request that something served (a reader of the request record)."""
        if record.served_by is None or record.status >= 400 and record.status != 499:
            return
        day = utc_day(self._clock())
        key = (record.app_id[:USAGE_LABEL_MAX_CHARS] or "anonymous", record.peer_device_id[:USAGE_LABEL_MAX_CHARS] or "anonymous",
               (record.model_served or record.model_requested or "")[:USAGE_LABEL_MAX_CHARS])
        prompt, completion = max(0, record.prompt_tokens or 0), max(0, record.completion_tokens or 0)
        with self._lock:
            if day != self._today:
                self._today, self._totals = day, {}
                self._writer.submit(self._prune)
            self._totals[key] = self._totals.get(key, 0) + prompt + completion
        self._writer.submit(self._write, day, key, prompt, completion)

    def _write(self, day: str, key: tuple[str, str, str], prompt: int, completion: int) -> None:
        try:
            assert self._db is not None
            self._db.execute(_UPSERT, (day, *key, prompt, completion))
            self._db.commit()
        except (sqlite3.Error, AssertionError):
            log.exception("usage row not written")

    def tokens_today(self, subject: QuotaSubject, per_device: bool, per_model: bool) -> int:
        """Tokens (prompt + completion) ``subject``'s app used today — on its device / model
        only when the quota rule is per device / per model."""
        with self._lock:
            if utc_day(self._clock()) != self._today:
                return 0
            return sum(tokens for (app, device, model), tokens in self._totals.items()
                       if app == subject.app_id and (not per_device or device == subject.device_id)
                       and (not per_model or model == subject.model))

    # -- reading -------------------------------------------------------------------
    def query(self, *, days: int = 7, app_id: str | None = None) -> list[dict[str, Any]]:
        """Usage rows of the last ``days`` days (blocking: call off the event loop)."""
        return self._writer.submit(self._query, days, app_id).result()

    def _query(self, days: int, app_id: str | None) -> list[dict[str, Any]]:
        assert self._db is not None
        since = utc_day(self._clock() - max(0, days - 1) * 86400)
        sql = ("SELECT day, app_id, device_id, model, requests, prompt_tokens, completion_tokens FROM usage "
               "WHERE day >= ?" + (" AND app_id = ?" if app_id is not None else "") +
               " ORDER BY day DESC, app_id, model LIMIT 10000")
        args: tuple[Any, ...] = (since, app_id) if app_id is not None else (since,)
        return [{"day": d, "appId": a, "deviceId": dv, "model": m, "requests": r, "promptTokens": p,
                 "completionTokens": c} for d, a, dv, m, r, p, c in self._db.execute(sql, args).fetchall()]

    def flush(self) -> None:
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._writer.submit(shut).result()
        self._writer.shutdown(wait=True)
