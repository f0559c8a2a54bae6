"""The registry of live managed serves: one JSON record per serve, guarded by one file lock.

Layout (docs/managed.md is the contract; the JavaScript provider goes through the same files)::

    <user state dir>/managed-serves/
      registry.lock        flock(2)-ed exclusively around every read-modify-write (briefly)
      start-locks/<key>.lock   flock(2)-ed across a cold start of that reuse key
      <serve id>.json      one record per serve (written atomically)
      <serve id>/          node.toml, serve.log, state/ (the serve's state dir)

A process is named by its pid plus its start time (field 22 of ``/proc/<pid>/stat``),
so a recycled pid is never mistaken for the process a record names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.fsutil import atomic_write_json, ensure_private_dir, read_json

RECORD_FORMAT = 1
LOCK_FILE = "registry.lock"
START_LOCKS = "start-locks"
LOCK_POLL_S = 0.05
TERMINATE_GRACE_S = 5.0
"""seconds a serve gets to exit after SIGTERM before SIGKILL."""


def default_registry_dir() -> Path:
    from platformdirs import user_state_dir

    return Path(user_state_dir("dvai-mesh")) / "managed-serves"


# --------------------------------------------------------------------------
# Processes


@dataclass(frozen=True, slots=True)
class ProcessRef:
    pid: int
    start: str | None
    """start time in clock ticks since boot (Linux); None where /proc is missing."""

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, process_start(pid))

    @classmethod
    def from_json(cls, value: Any) -> ProcessRef | None:
        if not isinstance(value, dict) or not isinstance(value.get("pid"), int):
            return None
        start = value.get("start")
        return cls(value["pid"], start if isinstance(start, str) else None)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start}

    def alive(self) -> bool:
        stat = _proc_stat(self.pid)
        if stat is not None:
            state, start = stat
            return state not in ("Z", "X") and (self.start is None or start == self.start)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir() or Path(f"/proc/{self.pid}").exists()


def process_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat is not None else None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) from /proc/<pid>/stat; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parens
    return (fields[0], fields[19]) if len(fields) > 19 else None


def terminate(process: ProcessRef, *, grace: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; a process that is gone (or not the one the
    reference names) is left alone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if not process.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and process.alive():
            time.sleep(0.05)


# --------------------------------------------------------------------------
# Records


@dataclass(slots=True)
class ServeRecord:
    id: str
    key: str
    shared: bool
    host: str
    port: int
    binary: str
    models: list[str]
    serve: ProcessRef
    supervisor: ProcessRef
    consumers: list[dict[str, Any]]
    """``{"pid", "start", "handle"}``: one entry per open handle."""
    idle_timeout_s: float
    created_ms: int
    status: str = "starting"
    """``starting`` until the first consumer saw it healthy, then ``ready``."""
    starter: ProcessRef | None = None
    """the process waiting for it to become healthy (while ``starting``)."""

    @property
    def base_url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.port}/v1"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT, "id": self.id, "key": self.key, "shared": self.shared,
            "host": self.host, "port": self.port, "base_url": self.base_url, "binary": self.binary,
            "models": self.models, "serve": self.serve.to_json(), "supervisor": self.supervisor.to_json(),
            "consumers": self.consumers, "idle_timeout_s": self.idle_timeout_s,
            "created_ms": self.created_ms, "status": self.status,
            "starter": self.starter.to_json() if self.starter is not None else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> ServeRecord | None:
        """A record, or None for anything malformed or of another format (treated as dead)."""
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            return None
        serve = ProcessRef.from_json(data.get("serve"))
        supervisor = ProcessRef.from_json(data.get("supervisor"))
        try:
            if serve is None or supervisor is None:
                return None
            return cls(
                id=str(data["id"]), key=str(data["key"]), shared=bool(data["shared"]),
                host=str(data["host"]), port=int(data["port"]), binary=str(data["binary"]),
                models=[str(m) for m in data["models"]], serve=serve, supervisor=supervisor,
                consumers=[c for c in data["consumers"] if ProcessRef.from_json(c) is not None],
                idle_timeout_s=float(data["idle_timeout_s"]), created_ms=int(data["created_ms"]),
                status=str(data.get("status", "starting")),
                starter=ProcessRef.from_json(data.get("starter")),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def live_consumers(self) -> list[dict[str, Any]]:
        return [c for c in self.consumers if _consumer_ref(c).alive()]


def connect_host(host: str) -> str:
    """The address a client dials for a serve bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _consumer_ref(entry: dict[str, Any]) -> ProcessRef:
    ref = ProcessRef.from_json(entry)
    assert ref is not None
    return ref


class Registry:
    """The registry directory; every mutation happens inside :meth:`locked`."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = Path(directory) if directory is not None else default_registry_dir()

    def locked(self, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold the registry lock (blocking up to ``timeout`` seconds; TimeoutError after).
        Held only for short read-modify-writes (and sweeps), never across a cold start."""
        return self._flock(self.dir / LOCK_FILE, timeout)

    def start_locked(self, key: str, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold the start lock of one reuse key: taken across a whole cold start, so concurrent
        starts of the same key queue and then find the first one's serve."""
        return self._flock(ensure_private_dir(self.dir / START_LOCKS) / f"{key}.lock", timeout)

    @contextlib.contextmanager
    def _flock(self, path: Path, timeout: float | None) -> Iterator[None]:
        ensure_private_dir(self.dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError("the managed-serve registry stayed locked") from None
                    time.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def try_locked(self) -> contextlib.AbstractContextManager[None] | None:
        """The lock if it is free right now, else None (for the supervisor's rounds)."""
        ensure_private_dir(self.dir)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None

        @contextlib.contextmanager
        def held() -> Iterator[None]:
            try:
                yield
            finally:
                os.close(fd)

        return held()

    def serve_dir(self, serve_id: str) -> Path:
        return self.dir / serve_id

    def record_path(self, serve_id: str) -> Path:
        return self.dir / f"{serve_id}.json"

    def records(self) -> list[ServeRecord]:
        out = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            record = ServeRecord.from_json(read_json(path, tolerate_corrupt=True))
            if record is not None and path.stem == record.id:
                out.append(record)
        return out

    def read(self, serve_id: str) -> ServeRecord | None:
        return ServeRecord.from_json(read_json(self.record_path(serve_id), tolerate_corrupt=True))

    def write(self, record: ServeRecord) -> None:
        atomic_write_json(self.record_path(record.id), record.to_json())

    def remove(self, serve_id: str, *, keep_dir: bool = False) -> None:
        self.record_path(serve_id).unlink(missing_ok=True)
        if not keep_dir:
            shutil.rmtree(self.serve_dir(serve_id), ignore_errors=True)

    def sweep(self) -> list[ServeRecord]:
        """Drop dead records, terminate serves whose supervisor died (or whose starter died
        mid-start), prune dead consumers; return the records still alive. Call under the lock."""
        alive = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            record = ServeRecord.from_json(read_json(path, tolerate_corrupt=True))
            if record is None or path.stem != record.id:
                path.unlink(missing_ok=True)  # malformed, or of a format this code does not know
                continue
            if not record.serve.alive():
                self.remove(record.id)
                continue
            starter_died = record.status == "starting" and (record.starter is None or not record.starter.alive())
            if not record.supervisor.alive() or starter_died:
                terminate(record.serve)
                terminate(record.supervisor)
                self.remove(record.id)
                continue
            consumers = record.live_consumers()
            if consumers != record.consumers:
                record.consumers = consumers
                self.write(record)
            alive.append(record)
        return alive


def now_ms() -> int:
    return int(time.time() * 1000)
