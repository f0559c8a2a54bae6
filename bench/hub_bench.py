"""Hub overhead: what API-key checks, HMAC signatures and quota accounting add per request.

Two real node processes on the SIMULATED engine (fast enough that the engine is not what
is measured): a plain node, and one with a key store, quotas (generous, so nothing is
refused) and usage accounting. Rounds alternate between them; each round sends N requests
at once (default 500) and records each request's latency. Printed: p50/p99 per node per
kind of request, and the added latency (hub − plain) of the medians over rounds.

  kinds: GET /v1/models (auth only: Bearer key vs none; HMAC-signed vs none) and
         POST /v1/chat/completions with max_tokens=1 (auth + quota + usage row)

Usage: python -m bench.hub_bench [--requests 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir, hub_dir = Path(tmp) / "plain", Path(tmp) / "hub"
        _, key = ApiKeyStore.load(hub_dir).create("com.bench")
        pairing_key = b"k" * 32
        store = PairingStore(hub_dir / "pairings.json")
        await store.add(Pairing(peer_device_id="dv-bench", peer_device_name="bench", app_id="com.bench",
                                key=pairing_key, via="static", paired_at=0, role="inbound"))
        plain = start_node_process(plain_dir, config_text=MODELS)
        hub = start_node_process(hub_dir, config_text=HUB)
        n = args.requests
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        try:
            connector = aiohttp.TCPConnector(limit=n)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(args.rounds):
                    cases = [
                        ("models, bearer", plain, hub, "GET", "/models", None, lambda: {"Authorization": f"Bearer {key}"}),
                        ("models, hmac", plain, hub, "GET", "/models", None,
                         lambda: sign_request_headers(pairing_key, "dv-bench", "com.bench", "GET", "/v1/models", b"")),
                        ("chat, bearer + quota", plain, hub, "POST", "/chat/completions", CHAT,
                         lambda: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}),
                    ]
                    for name, a, b, method, path, body, make in cases:
                        plain_lat = await burst(session, method, a.base_url + path, [{} for _ in range(n)], body)
                        hub_lat = await burst(session, method, b.base_url + path, [make() for _ in range(n)], body)
                        results.setdefault((name, "plain"), []).append((p(plain_lat, 0.5), p(plain_lat, 0.99)))
                        results.setdefault((name, "hub"), []).append((p(hub_lat, 0.5), p(hub_lat, 0.99)))
        finally:
            plain.stop()
            hub.stop()
    print(f"{n} concurrent requests per burst, {args.rounds} interleaved rounds, medians over rounds (ms)")
    print(f"{'request':24} {'plain p50':>10} {'hub p50':>10} {'plain p99':>10} {'hub p99':>10} {'added p50':>10} "
          f"{'added p99':>10}")
    for name in dict.fromkeys(k for k, _ in results):
        plain50 = statistics.median(r[0] for r in results[(name, "plain")])
        plain99 = statistics.median(r[1] for r in results[(name, "plain")])
        hub50 = statistics.median(r[0] for r in results[(name, "hub")])
        hub99 = statistics.median(r[1] for r in results[(name, "hub")])
        print(f"{name:24} {plain50:10.2f} {hub50:10.2f} {plain99:10.2f} {hub99:10.2f} {hub50 - plain50:10.2f} "
              f"{hub99 - plain99:10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
