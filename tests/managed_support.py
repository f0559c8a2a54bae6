"""Helpers for managed-mode tests: consumer processes and registry clean-up.

A consumer is ``python -m tests.managed_support '<options json>'``: it resolves a managed
serve (``managed_node``, sync form), prints ``{"pid", "port", "serve_id", "spawned"}`` as one
JSON line, then obeys commands on stdin, one per line: ``chat`` (one request, prints
``{"text": ...}``), ``close`` (detach, prints ``{"closed": true}``, exits). EOF closes too.
An error prints ``{"error": code, "message": ...}`` and exits 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

SIMULATED = {"engine": "simulated", "simulated_tok_per_s": 400.0}
"""Per-model config of the SIMULATED engine: these tests are about processes, not inference."""


def simulated_model(**config: Any) -> dict[str, Any]:
    return {"name": "GEMMA3_270M", "config": {**SIMULATED, **config}}


class Consumer:
    """A consumer process (see the module docstring)."""

    def __init__(self, options: dict[str, Any]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.managed_support", json.dumps(options)], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def read(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        import select

        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.process.kill()
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"consumer said nothing (exit {self.process.poll()}): {stderr}")
        value: dict[str, Any] = json.loads(line)
        return value

    def send(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def options_from_json(options: dict[str, Any]) -> dict[str, Any]:
    from node.managed import ManagedModel

    models = [m if isinstance(m, str) else ManagedModel(**m) for m in options.pop("models")]
    return {"models": models, **options}


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pid_alive(pid: int) -> bool:
    from node.managed.registry import ProcessRef

    return ProcessRef(pid, None).alive()


def port_refuses(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing accepts connections on ``port`` any more. A killed serve's pid can look dead (its
    main thread a zombie) a moment before its other threads are gone and its socket is closed."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def killed(pid: int, port: int, timeout: float = 10.0) -> bool:
    """Wait until the serve ``pid`` on ``port`` is gone: no process, no listening socket."""
    return wait_until(lambda: not pid_alive(pid) and port_refuses(port), timeout)


def clean_registry(registry_dir: Path) -> None:
    """Terminate every serve and supervisor a test left in its registry."""
    from node.managed.registry import Registry, terminate

    registry = Registry(registry_dir)
    if not registry.dir.is_dir():
        return
    for record in registry.records():
        terminate(record.supervisor, grace=2.0)
        terminate(record.serve, grace=2.0)
        registry.remove(record.id)


def _main(argv: list[str]) -> int:
    from node.managed import ManagedModeError, managed_node

    options = options_from_json(json.loads(argv[1]))
    try:
        context = managed_node(**options)
        node = context.__enter__()
    except ManagedModeError as exc:
        print(json.dumps({"error": exc.code.value, "message": exc.message}), flush=True)
        return 1
    print(json.dumps({"pid": node.pid, "port": node.port, "serve_id": node.serve_id,
                      "spawned": node.spawned}), flush=True)
    client = node.openai()
    for line in sys.stdin:
        command = line.strip()
        if command == "chat":
            reply = client.chat.completions.create(
                model=node.default_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            print(json.dumps({"text": reply.choices[0].message.content, "pid": node.pid}), flush=True)
        elif command == "close":
            break
    node.close()
    print(json.dumps({"closed": True}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
