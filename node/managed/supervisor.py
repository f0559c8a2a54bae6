"""The detached supervisor of one managed serve: ``python -m node.managed.supervisor SPEC``.

It runs in its own session (a consumer's Ctrl-C does not reach it), starts the serve
as its child, tells the starter the serve's pid on stdout, then watches: when the
serve's record has had no live consumer for the idle timeout (at once for a dedicated
serve), or the record is gone, it terminates the serve. When the serve exits on its
own it drops the record. A dead supervisor is noticed by the next start's sweep,
which terminates its serve, so a hard crash never strands a process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from .registry import ProcessRef, Registry, terminate

LOCK_WAIT_ON_EXIT_S = 10.0
LOCK_WAIT_ON_SIGNAL_S = 2.0
RECORD_WAIT_S = 60.0
"""how long a new serve may run before its starter has written its record."""


def poll_interval(idle_timeout: float) -> float:
    """How often the supervisor looks at its consumers: a quarter of the idle timeout, 50 ms–1 s."""
    return min(1.0, max(0.05, idle_timeout / 4))


class Supervisor:
    def __init__(self, spec: dict[str, Any], serve: subprocess.Popen[bytes], log: TextIO) -> None:
        self.registry = Registry(Path(spec["registry_dir"]))
        self.serve_id: str = spec["serve_id"]
        self.shared: bool = spec["shared"]
        self.idle_timeout: float = spec["idle_timeout_s"]
        self.serve = serve
        self.serve_ref = ProcessRef.of(serve.pid)
        self.log = log
        self.stop = threading.Event()

    def run(self) -> int:
        idle_since: float | None = None
        interval = poll_interval(self.idle_timeout)
        started, seen_record = time.monotonic(), False
        while not self.stop.wait(interval):
            code = self.serve.poll()
            if code is not None:
                self.note(f"serve exited with code {code}")
                self._drop_record(wait=LOCK_WAIT_ON_EXIT_S)
                return 0
            held = self.registry.try_locked()
            if held is None:
                continue  # a start holds the lock (maybe waiting for this serve): next round
            with held:
                record = self.registry.read(self.serve_id)
                if record is None and not seen_record and time.monotonic() - started < RECORD_WAIT_S:
                    continue  # the starter writes the record once it knows the serve's pid
                if record is None or record.serve.pid != self.serve.pid:
                    self.note("record gone: stopping the serve")
                    break
                seen_record = True
                live = record.live_consumers()
                if live != record.consumers:
                    record.consumers = live
                    self.registry.write(record)
                if live:
                    idle_since = None
                    continue
                now = time.monotonic()
                idle_since = idle_since if idle_since is not None else now
                if not self.shared or now - idle_since >= self.idle_timeout:
                    self.note("no consumers left: reaping the serve")
                    self.registry.remove(self.serve_id, keep_dir=True)  # nobody attaches from now on
                    break
        terminate(self.serve_ref)
        self.serve.poll()
        # Stopped by a signal, the sender may hold the lock while it waits for us: do not wait long.
        self._drop_record(wait=LOCK_WAIT_ON_SIGNAL_S if self.stop.is_set() else LOCK_WAIT_ON_EXIT_S)
        return 0

    def _drop_record(self, *, wait: float) -> None:
        """Remove the record (and the serve's directory) if it still names this serve."""
        try:
            with self.registry.locked(timeout=wait):
                record = self.registry.read(self.serve_id)
                if record is None or record.serve.pid == self.serve.pid:
                    # a starter still waiting reads serve.log for its error: it removes the directory
                    self.registry.remove(self.serve_id, keep_dir=record is not None and record.status == "starting")
        except TimeoutError:
            pass  # whoever holds the lock (a start that gave up on us, a sweep) drops it

    def note(self, message: str) -> None:
        self.log.write(f"[managed supervisor {os.getpid()}] {message}\n")
        self.log.flush()


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    log = open(spec["log"], "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    try:
        serve = subprocess.Popen(
            spec["command"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=spec["env"], cwd=spec["cwd"],
        )
    except OSError as exc:
        print(json.dumps({"error": "serve_spawn_failed", "message": f"cannot run {spec['command'][0]}: {exc}"}),
              flush=True)
        return 1
    print(json.dumps({"serve": ProcessRef.of(serve.pid).to_json()}), flush=True)
    _detach_stdout()
    supervisor = Supervisor(spec, serve, log)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop.set())
    return supervisor.run()


def _detach_stdout() -> None:
    """The starter stops reading after the handshake line: later writes must not block or fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
