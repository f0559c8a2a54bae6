"""Discovery timing on loopback (real multicast on 127.0.0.1, stub health servers).

    .venv/bin/python -m bench.discovery_bench [--runs 5]

Measures, as the median over ``--runs`` repetitions:

* join: from ``DiscoveryService.start()`` of a new node until it is listed in a running
  peer's table (target ≤ 1.5 s), until it is listed *reachable* (health-checked), and
  until the new node lists the peer (the other direction);
* clean leave: from ``stop()`` until the peer's table no longer lists it (≤ 0.5 s);
* crash: from SIGKILL of a node process until the peer marks it unreachable (≤ 5 s),
  with the default timing (health every 1 s, unreachable after 3 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from node.discovery.peers import PeerState  # noqa: E402
from node.discovery.service import DiscoveryService  # noqa: E402
from tests.discovery_stub import StubNode  # noqa: E402

TARGETS = {"join": 1.5, "leave": 0.5, "crash": 5.0}


async def _until(predicate: Callable[[], bool], within: float, poll: float = 0.002) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(poll)
    return time.monotonic() - started


async def join_and_leave(watcher: StubNode, state_dir: Path, run: int) -> dict[str, float]:
    node = StubNode(state_dir / f"join{run}", name=f"join{run}")
    await node.server.start()  # the node's HTTP server is up before discovery starts
    node.session = aiohttp.ClientSession()
    node.service = DiscoveryService(node.config, node.identity, node.table, node.session, node.advertised)
    started = time.monotonic()
    await node.service.start()
    await _until(lambda: node.device_id in watcher.table, 5)
    listed = time.monotonic() - started
    await _until(lambda: watcher.sees(node), 5)
    reachable = time.monotonic() - started
    await _until(lambda: node.sees(watcher), 5)
    sees_back = time.monotonic() - started
    await asyncio.sleep(0.3)
    started = time.monotonic()
    stop = asyncio.create_task(node.stop())
    leave = await _until(lambda: node.device_id not in watcher.table, 5)
    await stop
    return {"join": listed, "join_reachable": reachable, "join_sees_back": sees_back, "leave": leave}


async def crash(watcher: StubNode, state_dir: Path, run: int) -> float:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.discovery_node", "--state-dir", str(state_dir / f"crash{run}"),
        "--name", f"crash{run}", cwd=REPO, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stdout is not None
        ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        victim = str(ready["deviceId"])
        await _until(lambda: (p := watcher.table.get(victim)) is not None and p.reachable, 5)
        await asyncio.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await process.wait()
        await _until(lambda: (p := watcher.table.get(victim)) is None or p.state is PeerState.UNREACHABLE,
                     10, poll=0.01)
        return time.monotonic() - killed
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def main(runs: int) -> int:
    logging.getLogger("node").setLevel(logging.ERROR)  # the crash runs warn on purpose
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dvai-discovery-bench-") as tmp:
        state_dir = Path(tmp)
        watcher = StubNode(state_dir / "watcher", name="watcher")
        await watcher.start()
        try:
            for run in range(runs):
                for key, value in (await join_and_leave(watcher, state_dir, run)).items():
                    results.setdefault(key, []).append(value)
                results.setdefault("crash", []).append(await crash(watcher, state_dir, run))
        finally:
            await watcher.stop()
    print(f"discovery on loopback, {runs} runs (median, min, max in seconds)")
    failed = False
    for key, values in results.items():
        median = statistics.median(values)
        target = TARGETS.get(key)
        verdict = ""
        if target is not None:
            verdict = f"target <= {target:.1f} s: {'ok' if median <= target else 'MISSED'}"
            failed |= median > target
        print(f"  {key:<16} {median:7.3f}  ({min(values):.3f} .. {max(values):.3f})  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    sys.exit(asyncio.run(main(parser.parse_args().runs)))
