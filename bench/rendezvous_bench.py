"""Rendezvous benchmark: pairing sessions created+completed per second on one core, memory per idle session.

The server runs in a subprocess pinned to one CPU (``os.sched_setaffinity``);
the load generator runs in this process, pinned to another CPU when there is
one. On a two-core machine the load generator (aiohttp client, one core)
saturates before the server does, so besides the measured rate the bench
prints the server's CPU time per pairing and the rate that gives on one
saturated core (1 ÷ CPU seconds per pairing). Three measurements:

  protocol   raw HTTP clients doing exactly what the real pairing clients do
             (create, long-poll for the join, join, confirm, confirm, finish,
             and the long-polls between: 9 requests per pairing), with opaque
             messages; this is the server's capacity.
  full       the real ``QrPairingInitiator`` / ``QrPairingScanner`` (X25519,
             HKDF, Ed25519, MACs); bounded by the client's CPU as much as the server's.
  idle       N sessions created and left open: server RSS growth ÷ N, and the
             SQLite bytes ÷ N (sessions live in SQLite, not in Python objects).

    .venv/bin/python bench/rendezvous_bench.py [--pairings 2000] [--concurrency 64] [--idle 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KEY = "A" * 42 + "E"
MESSAGE = "m" * 330
"""about the size of a real confirmation message."""

LIMITS = {
    "create_per_minute": 1e9, "join_per_minute": 1e9, "requests_per_minute": 1e9,
    "max_sessions": 10_000_000, "max_waiters": 1_000_000,
}


# --------------------------------------------------------------------------
# Server subprocess


def serve(db: str, cpu: int) -> None:
    """Child: pin to ``cpu``, serve on a free port, print it, run until stdin closes."""
    from rendezvous.config import RendezvousConfig
    from rendezvous.server import RendezvousServer

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})

    async def run() -> None:
        config = RendezvousConfig(port=0, db=db, log_level="warning", **LIMITS)  # type: ignore[arg-type]
        server = RendezvousServer(config)
        await server.start()
        print(f"PORT {server.port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()

    asyncio.run(run())


class ServerProcess:
    def __init__(self, db: str, cpu: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", db, "--cpu", str(cpu)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


# --------------------------------------------------------------------------
# Load


async def _call(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, json=body, headers=headers) as response:
        data = await response.json()
        if response.status >= 400:
            raise RuntimeError(f"{method} {url}: {response.status} {data}")
        return data


async def _wait_for(http: aiohttp.ClientSession, base: str, token: str, after: int) -> int:
    page = await _call(http, "GET", f"{base}/events?after={after}&wait=25", token)
    return int(page["last_seq"])


async def protocol_pairing(http: aiohttp.ClientSession, url: str, device_id: str) -> None:
    created = await _call(http, "POST", f"{url}/v1/sessions", body={"initiator_public_key": KEY})
    base = f"{url}/v1/sessions/{created['session_id']}"
    itok = created["initiator_token"]

    async def initiator() -> None:
        seq = await _wait_for(http, base, itok, 1)          # joined
        if seq < 3:
            seq = await _wait_for(http, base, itok, seq)    # scanner's confirmation
        await _call(http, "POST", f"{base}/confirm", itok, {"message": MESSAGE})
        await _wait_for(http, base, itok, 4)                # finish

    async def scanner() -> None:
        joined = await _call(http, "POST", f"{base}/join",
                             body={"scanner_public_key": KEY, "scanner_device_id": device_id})
        stok = joined["scanner_token"]
        await _call(http, "POST", f"{base}/confirm", stok, {"message": MESSAGE})
        await _wait_for(http, base, stok, 3)                # initiator's confirmation
        await _call(http, "POST", f"{base}/finish", stok, {"message": MESSAGE})

    await asyncio.gather(initiator(), scanner())


async def full_pairing(http: aiohttp.ClientSession, url: str, identities: tuple[Any, Any]) -> None:
    from node.transport.rendezvous_client import QrPairingInitiator, QrPairingScanner

    initiator = QrPairingInitiator(identity=identities[0], device_name="a", rendezvous_url=url, http=http)
    scanner = QrPairingScanner(identity=identities[1], device_name="b", http=http)
    offer = await initiator.start()
    first, second = await asyncio.gather(initiator.wait(), scanner.pair(offer.uri))
    assert first.pairing_key == second.pairing_key


async def run_pairings(server: ServerProcess, count: int, concurrency: int, mode: str) -> tuple[float, float]:
    """(pairings per second, server CPU seconds per pairing)."""
    from node.identity import DeviceIdentity

    identities = (DeviceIdentity.generate(), DeviceIdentity.generate())
    connector = aiohttp.TCPConnector(limit=concurrency * 4)
    async with aiohttp.ClientSession(connector=connector) as http:
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                if mode == "protocol":  # the other mode is "full-crypto"
                    await protocol_pairing(http, server.url, identities[1].device_id)
                else:
                    await full_pairing(http, server.url, identities)

        remaining = min(count, 50)  # warm-up: connections, code paths, SQLite pages
        await asyncio.gather(*(worker() for _ in range(min(concurrency, 8))))
        remaining = count
        cpu_before, started = server.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, server.cpu_seconds() - cpu_before
    return count / elapsed, cpu / count


async def idle_sessions(server: ServerProcess, count: int) -> int:
    """Create ``count`` sessions and leave them open; returns the server's RSS growth in bytes."""
    async with aiohttp.ClientSession() as http:
        await _call(http, "POST", f"{server.url}/v1/sessions", body={"initiator_public_key": KEY})
        await asyncio.sleep(0.2)
        before = server.rss_bytes()
        for start in range(0, count, 200):
            await asyncio.gather(*(
                _call(http, "POST", f"{server.url}/v1/sessions", body={"initiator_public_key": KEY})
                for _ in range(min(200, count - start))
            ))
        await asyncio.sleep(0.2)
        return server.rss_bytes() - before


def _pin_self(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {cpu})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairings", type=int, default=2000)
    parser.add_argument("--full-pairings", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--serve", metavar="DB", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.cpu)
        return
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    server_cpu = cpus[0]
    _pin_self(cpus[1] if len(cpus) > 1 else cpus[0])
    print(f"server pinned to CPU {server_cpu}; load generator on {'CPU ' + str(cpus[1]) if len(cpus) > 1 else 'the same CPU'}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, db in (("SQLite file (WAL)", str(Path(tmp) / "bench.sqlite3")), ("SQLite :memory:", ":memory:")):
            server = ServerProcess(db, server_cpu)
            try:
                for mode, count in (("protocol", args.pairings), ("full-crypto", args.full_pairings)):
                    rate, cpu = asyncio.run(run_pairings(server, count, args.concurrency, mode))
                    print(f"[{label}] {mode} pairings: measured {rate:7.1f}/s; server CPU {cpu * 1000:.2f} ms "
                          f"per pairing = {1 / cpu:7.1f}/s when the server's core is saturated")
                grown = asyncio.run(idle_sessions(server, args.idle))
                line = f"[{label}] idle sessions: {args.idle}, server RSS growth {grown / 1024:.0f} KiB"
                line += f" = {grown / args.idle:.0f} bytes per idle session"
                if db != ":memory:":
                    size = sum(p.stat().st_size for p in Path(tmp).glob("bench.sqlite3*"))
                    sessions = args.idle + args.pairings + args.full_pairings + 16
                    line += f"; SQLite files {size / 1024:.0f} KiB for ~{sessions} sessions"
                    line += f" = {size / sessions:.0f} bytes per stored session"
                print(line)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
