"""Resolving a managed serve: sweep the registry, attach to a matching live serve or spawn one,
and detach. Blocking code (file lock, subprocesses, health polls): async callers run it in a thread.

Everything between taking the registry lock and writing the record happens under the lock,
including a cold start's wait for health: concurrent starts from several processes queue on
the lock and the later ones find the first one's serve, so they converge on one serve.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.fsutil import atomic_write_bytes, atomic_write_json, ensure_private_dir
from .errors import (
    BinaryNotFoundError,
    PortAllocationFailedError,
    ServeExitedError,
    ServeSpawnFailedError,
    ServeStartTimeoutError,
)
from .options import ManagedOptions, ResolvedModel, resolve_models, reuse_key, synthesize_config
from .registry import ProcessRef, Registry, ServeRecord, connect_host, now_ms, terminate

HEALTH_POLL_S = 0.1
HEALTH_REQUEST_TIMEOUT_S = 2.0
HANDSHAKE_TIMEOUT_S = 30.0
"""seconds for the supervisor to start and name the serve's pid (a Python start-up)."""
LOG_TAIL_BYTES = 4000
REGISTRY_LOCK_WAIT_S = 60.0
"""the registry lock is held for moments (sweeps may stop orphans: seconds), never a cold start."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """A consumer's hold on a serve: what the handle exposes and what ``detach`` needs."""

    record: ServeRecord
    handle: str
    consumer: ProcessRef
    spawned: bool
    """this call started the serve (a cold start) rather than joining a live one."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What a start needs, decided before touching the registry."""

    models: tuple[ResolvedModel, ...]
    binary: str
    key: str
    options: ManagedOptions


def plan(options: ManagedOptions) -> Plan:
    models = resolve_models(options.models)
    binary = resolve_binary(options.binary)
    return Plan(models, binary, reuse_key(models, host=options.host, binary=binary), options)


def resolve_binary(binary: str | None) -> str:
    """The ``dvai-node`` executable: given, beside this Python (its venv), or on PATH."""
    if binary is not None:
        path = Path(binary).expanduser()
        found = str(path) if path.is_file() else shutil.which(binary)
        if found is None:
            raise BinaryNotFoundError(f"dvai-node binary not found: {binary}")
        return os.path.realpath(found)
    beside = Path(sys.executable).parent / "dvai-node"
    if beside.is_file():
        return os.path.realpath(beside)
    found = shutil.which("dvai-node")
    if found is None:
        raise BinaryNotFoundError("dvai-node is not installed beside this Python nor on PATH "
                                  "(pip install dvai-mesh, or pass binary=...)")
    return os.path.realpath(found)


def attach(plan: Plan, *, consumer: ProcessRef | None = None, registry: Registry | None = None) -> Attachment:
    """Join a live serve with this plan's key, or start one; register ``consumer`` (this process)."""
    options = plan.options
    registry = registry or Registry(options.registry_dir)
    consumer = consumer or ProcessRef.of(os.getpid())
    handle = secrets.token_hex(8)
    entry = {**consumer.to_json(), "handle": handle}
    lock_wait = options.start_timeout + 30.0  # another start of this key may be mid cold start
    try:
        with registry.start_locked(plan.key, timeout=lock_wait):
            with registry.locked(timeout=REGISTRY_LOCK_WAIT_S):
                live = registry.sweep()
                if options.shared:
                    for record in live:
                        # any answer will do: a model unloaded after keep_alive reads "loading",
                        # and a second serve with the same key is what sharing must never produce
                        if record.key == plan.key and record.shared and _healthy(record) is not None:
                            record.consumers.append(entry)
                            registry.write(record)
                            return Attachment(record, handle, consumer, spawned=False)
            record = _spawn(plan, registry, entry)
            return Attachment(record, handle, consumer, spawned=True)
    except TimeoutError as exc:
        if isinstance(exc, ServeStartTimeoutError):
            raise
        raise ServeStartTimeoutError(
            f"another process kept the managed-serve registry locked for {lock_wait:g} s") from exc


def detach(attachment: Attachment, *, registry_dir: Path | None = None) -> None:
    """Drop this handle from its serve's consumers. Never stops a serve: its supervisor reaps it
    once no consumer is left (after the idle timeout; at once for a dedicated serve)."""
    registry = Registry(registry_dir)
    with registry.locked(timeout=REGISTRY_LOCK_WAIT_S):
        record = registry.read(attachment.record.id)
        if record is None:
            return
        kept = [c for c in record.consumers if c.get("handle") != attachment.handle]
        if kept != record.consumers:
            record.consumers = kept
            registry.write(record)
        if not record.shared and not kept:
            # a dedicated serve ends with its consumer: wake its supervisor now
            _signal(record.supervisor)


def list_serves(registry_dir: Path | None = None) -> list[ServeRecord]:
    registry = Registry(registry_dir)
    with registry.locked(timeout=REGISTRY_LOCK_WAIT_S):
        return registry.sweep()


# --------------------------------------------------------------------------
# Cold start (under the registry lock)


def _spawn(plan: Plan, registry: Registry, consumer: dict[str, Any]) -> ServeRecord:
    """Start a serve (the caller holds the key's start lock, not the registry lock)."""
    options = plan.options
    port = _allocate_port(options.host, options.port)
    serve_id = secrets.token_hex(6)
    directory = ensure_private_dir(registry.serve_dir(serve_id))
    config = directory / "node.toml"
    atomic_write_bytes(config, synthesize_config(plan.models).encode())
    log = directory / "serve.log"
    log.touch(mode=0o600)
    command = [plan.binary, "serve", "--config", str(config), "--state-dir", str(directory / "state"),
               "--host", options.host, "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}  # the config is the spec
    env["PYTHONUNBUFFERED"] = "1"
    spec = {"serve_id": serve_id, "registry_dir": str(registry.dir), "command": command, "env": env,
            "cwd": str(directory), "log": str(log), "shared": options.shared,
            "idle_timeout_s": options.idle_timeout}
    atomic_write_json(directory / "supervisor.json", spec)
    supervisor, serve = _start_supervisor(directory, registry, serve_id)
    record = ServeRecord(
        id=serve_id, key=plan.key, shared=options.shared, host=options.host, port=port,
        binary=plan.binary, models=[m.alias for m in plan.models], serve=serve, supervisor=supervisor,
        consumers=[consumer], idle_timeout_s=options.idle_timeout, created_ms=now_ms(),
        starter=ProcessRef.of(os.getpid()),
    )
    try:
        with registry.locked(timeout=REGISTRY_LOCK_WAIT_S):
            registry.write(record)
        _wait_healthy(record, log, options.start_timeout)
        with registry.locked(timeout=REGISTRY_LOCK_WAIT_S):
            current = registry.read(serve_id)
            if current is None or not current.serve.alive():
                raise ServeExitedError(f"dvai-node serve exited as it became healthy:\n{_tail(log)}",
                                       output=_tail(log))
            current.status, current.starter = "ready", None
            registry.write(current)
            return current
    except BaseException:
        terminate(supervisor)  # it terminates the serve on SIGTERM
        terminate(serve)
        with registry.locked(timeout=REGISTRY_LOCK_WAIT_S):
            registry.remove(serve_id)
        raise


def _allocate_port(host: str, pinned: int | None) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, pinned or 0))
            return int(sock.getsockname()[1])
    except OSError as exc:
        what = f"port {pinned}" if pinned else "a free port"
        raise PortAllocationFailedError(f"cannot allocate {what} on {host}: {exc.strerror or exc}") from exc


def _start_supervisor(directory: Path, registry: Registry, serve_id: str) -> tuple[ProcessRef, ProcessRef]:
    command = [sys.executable, "-m", "node.managed.supervisor", str(directory / "supervisor.json")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_package_root()), env.get("PYTHONPATH")]))
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, start_new_session=True, cwd=directory, env=env)
    except OSError as exc:
        registry.remove(serve_id)
        raise ServeSpawnFailedError(f"cannot start the managed-serve supervisor: {exc}") from exc
    assert process.stdout is not None
    line = b""
    ready, _, _ = select.select([process.stdout], [], [], HANDSHAKE_TIMEOUT_S)
    if ready:
        line = process.stdout.readline()
    process.stdout.close()
    supervisor = ProcessRef.of(process.pid)
    try:
        message = json.loads(line) if line else {}
    except ValueError:
        message = {}
    serve = ProcessRef.from_json(message.get("serve"))
    if serve is None:
        terminate(supervisor)
        process.wait(5)
        registry.remove(serve_id)
        reason = message.get("message") or f"the supervisor exited without starting it (code {process.poll()})"
        raise ServeSpawnFailedError(f"could not spawn dvai-node serve: {reason}")
    # The supervisor is detached (its own session) and usually outlives us; should it end first,
    # a daemon thread reaps it so no zombie is left behind in a long-lived consumer.
    threading.Thread(target=process.wait, name=f"reap-supervisor-{process.pid}", daemon=True).start()
    return supervisor, serve


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent.parent


def _wait_healthy(record: ServeRecord, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not record.serve.alive():
            _wait_for_exit_note(record, log)
            raise ServeExitedError(
                f"dvai-node serve exited before it became healthy:\n{_tail(log)}",
                exit_code=_exit_code(log), output=_tail(log))
        status = _healthy(record)
        if status == "ok":
            return
        if status in ("failed", "degraded"):
            terminate(record.serve)
            raise ServeExitedError(f"dvai-node serve could not load its models ({status}):\n{_tail(log)}",
                                   output=_tail(log))
        if time.monotonic() >= deadline:
            raise ServeStartTimeoutError(
                f"dvai-node serve was not healthy after {timeout:g} s (raise start_timeout for large "
                f"models):\n{_tail(log)}")
        time.sleep(HEALTH_POLL_S)


def _healthy(record: ServeRecord) -> str | None:
    """The serve's health status (``ok``, ``loading``, …), or None when it does not answer."""
    url = f"http://{connect_host(record.host)}:{record.port}/v1/dvai/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=HEALTH_REQUEST_TIMEOUT_S) as response:
            body = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    status = body.get("status") if isinstance(body, dict) else None
    return status if isinstance(status, str) else None


def _wait_for_exit_note(record: ServeRecord, log: Path, wait: float = 2.0) -> None:
    """Give the supervisor a moment to log the serve's exit code."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and _exit_code(log) is None and record.supervisor.alive():
        time.sleep(0.05)


def _exit_code(log: Path) -> int | None:
    marker = "] serve exited with code "
    for line in reversed(_tail(log).splitlines()):
        if marker in line:
            try:
                return int(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


def _tail(log: Path) -> str:
    try:
        with log.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _signal(process: ProcessRef) -> None:
    import signal

    if process.alive():
        try:
            os.kill(process.pid, signal.SIGTERM)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
