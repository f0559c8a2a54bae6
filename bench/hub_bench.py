"""Hub overhead: what API-key checks, HMAC signatures and quota accounting add per request.

Two real node processes on the SIMULATED engine (fast enough that the engine is not what
is measured): a plain node, and one with a key store, quotas (generous, so nothing is
refused) and usage accounting. Rounds alternate between them; each round sends N requests
at once (default 500) and records each request's latency. Printed: p50/p99 per node per
kind of request, and the added latency (hub − plain) of the medians over rounds.

  kinds: GET /v1/models (auth only: Bearer key vs none; HMAC-signed vs none) and
         POST /v1/chat/completions with max_tokens=1 (auth + quota + usage row)

At 500 at once each request also waits for the ones ahead of it on the node's event loop,
so the added latency of a burst is the per-request cost summed over the queue ahead. Two
more figures isolate the per-request cost: the node's CPU time per request in the burst
(from /proc; hub − plain) and the latency of requests sent one at a time (``--serial``
requests per round, p50/p99, hub − plain). Rounds alternate which node goes first.

Usage: python -m bench.hub_bench [--requests 500] [--rounds 5] [--serial 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.hub.keys import ApiKeyStore  # noqa: E402
from node.pairing.store import Pairing, PairingStore  # noqa: E402
from node.security.signing import sign_request_headers  # noqa: E402
from tests.conftest import start_node_process  # noqa: E402

MODELS = """
[models.sim]
engine = "simulated"
simulated_tok_per_s = 100000.0
queue_depth = 100000
"""
HUB = MODELS + """
[[hub.quotas]]
app_id = "*"
requests_per_minute = 1000000
tokens_per_day = 1000000000
concurrent = 100000
"""
CHAT = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


async def burst(session: aiohttp.ClientSession, method: str, url: str, headers: list[dict[str, str]],
                body: bytes | None) -> list[float]:
    async def one(h: dict[str, str]) -> float:
        started = time.perf_counter()
        async with session.request(method, url, data=body, headers=h) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{method} {url}: HTTP {response.status}")
        return (time.perf_counter() - started) * 1000

    return list(await asyncio.gather(*(one(h) for h in headers)))


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serial(session: aiohttp.ClientSession, method: str, url: str, headers: list[dict[str, str]],
                 body: bytes | None) -> list[float]:
    """One request at a time: latency without a queue ahead."""
    return [(await burst(session, method, url, [h], body))[0] for h in headers]


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serial", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir, hub_dir = Path(tmp) / "plain", Path(tmp) / "hub"
        _, key = ApiKeyStore.load(hub_dir).create("com.bench")
        pairing_key = b"k" * 32
        store = PairingStore(hub_dir / "pairings.json")
        await store.add(Pairing(peer_device_id="dv-bench", peer_device_name="bench", peer_app_id="com.bench",
                                key=pairing_key, via="static", paired_at=0, role="inbound"))
        plain = start_node_process(plain_dir, config_text=MODELS)
        hub = start_node_process(hub_dir, config_text=HUB)
        n = args.requests
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        try:
            connector = aiohttp.TCPConnector(limit=n)
            async with aiohttp.ClientSession(connector=connector) as session:
                for round_index in range(args.rounds):
                    cases = [
                        ("models, bearer", plain, hub, "GET", "/models", None, lambda: {"Authorization": f"Bearer {key}"}),
                        ("models, hmac", plain, hub, "GET", "/models", None,
                         lambda: sign_request_headers(pairing_key, "dv-bench", "com.bench", "GET", "/v1/models", b"")),
                        ("chat, bearer + quota", plain, hub, "POST", "/chat/completions", CHAT,
                         lambda: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}),
                    ]
                    for name, a, b, method, path, body, make in cases:
                        sides = [("plain", a, lambda: {}), ("hub", b, make)]
                        if round_index % 2:
                            sides.reverse()
                        for side, node, headers in sides:
                            before = cpu_seconds(node.process.pid)
                            lat = await burst(session, method, node.base_url + path, [headers() for _ in range(n)],
                                              body)
                            cpu_ms = (cpu_seconds(node.process.pid) - before) * 1000 / n
                            one = await serial(session, method, node.base_url + path,
                                               [headers() for _ in range(args.serial)], body)
                            results.setdefault((name, side), []).append(
                                (p(lat, 0.5), p(lat, 0.99), cpu_ms, p(one, 0.5), p(one, 0.99)))
        finally:
            plain.stop()
            hub.stop()
    def median(name: str, side: str, column: int) -> float:
        return statistics.median(r[column] for r in results[(name, side)])

    print(f"{n} concurrent requests per burst, then {args.serial} one at a time; {args.rounds} rounds, "
          "order alternating; medians over rounds (ms)")
    print(f"{'request':22} {'burst p50 plain/hub':>20} {'burst p99 plain/hub':>20} {'added p99':>9} "
          f"{'CPU/req plain/hub':>18} {'added CPU':>9} {'1-at-a-time p99 plain/hub':>26} {'added p99':>9}")
    for name in dict.fromkeys(k for k, _ in results):
        cells = [(median(name, "plain", c), median(name, "hub", c)) for c in range(5)]
        (b50, h50), (b99, h99), (pc, hc), _, (s99, t99) = cells
        print(f"{name:22} {b50:9.2f}/{h50:<10.2f} {b99:9.2f}/{h99:<10.2f} {h99 - b99:9.2f} "
              f"{pc:8.3f}/{hc:<9.3f} {hc - pc:9.3f} {s99:12.2f}/{t99:<13.2f} {t99 - s99:9.2f}")

if __name__ == "__main__":
    asyncio.run(main())
