"""Offload benchmarks on real node processes (loopback): the cost of a hop, and routing under load.

1. One offload hop, A/B interleaved (direct to the peer with ``X-DVAI-Offload: never``,
   then through a slow entry node that forwards it, order alternating per round):
   decode tok/s through the hop ÷ direct (target ≥ 0.98) and the extra time to first token
   (target ≤ 3 ms), medians over the rounds. Once against the REAL engine (llama.cpp, the
   default model) and once against a SIMULATED 100 tok/s peer, whose fixed timing isolates
   the hop's own cost from the real engine's jitter.
2. Routing under load: SIMULATED workers at 10, 20 and 40 tok/s (real node processes),
   closed-loop clients streaming fixed-length requests. Compared in the same harness:
   - ``dvai``: every request goes to a slow entry node (SIMULATED 1 tok/s, below its
     threshold), whose offload router picks the worker;
   - ``round-robin`` / ``least-used`` / ``least-in-flight``: client-side dispatchers that
     send each request straight to a worker with ``X-DVAI-Offload: never`` (next in turn /
     fewest requests sent so far / fewest of its requests in flight).
   Printed: throughput ÷ ideal (ideal = sum of the workers' rates; tokens arriving in the
   measurement window), p50/p95 latency (send → last token; requests unfinished at the end
   count with their age), and each worker's share of requests.

    .venv/bin/python bench/offload_bench.py [--rounds 12] [--load-seconds 45] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from node.capability.probe import PROBE_PROMPT  # noqa: E402
from tests.conftest import NodeProcess, start_node_process  # noqa: E402
from tests.offload_support import (  # noqa: E402
    device_id_for,
    node_config,
    offload_status,
    pair,
    peer_state,
    simulated_models,
    wait_until,
)

HOP_TOKENS = 48
WORKER_RATES = (10.0, 20.0, 40.0)
LOAD_TOKENS = 40


def start_all(specs: dict[str, tuple[Path, str]]) -> dict[str, NodeProcess]:
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(start_node_process, state, config_text=config, timeout=120)
                   for name, (state, config) in specs.items()}
        return {name: future.result() for name, future in futures.items()}


async def device_id(session: aiohttp.ClientSession, node: NodeProcess) -> str:
    async with session.get(node.root + "/v1/dvai/health") as response:
        return str((await response.json())["deviceId"])


async def connect(session: aiohttp.ClientSession, entry: NodeProcess, peers: Sequence[NodeProcess]) -> None:
    ids = [await device_id(session, p) for p in peers]

    async def reachable() -> bool:
        return all([await peer_state(session, entry.root, d) == "reachable" for d in ids])

    await wait_until(reachable, 20)
    await asyncio.gather(*(pair(session, entry.root, p.base_url) for p in peers))


@dataclass
class Timed:
    started: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    arrivals: list[float] = field(default_factory=list)
    served_by: str | None = None
    status: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.started

    @property
    def rate(self) -> float | None:
        if self.tokens < 2 or self.first is None or self.last is None or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)


async def timed_stream(session: aiohttp.ClientSession, url: str, body: dict[str, object],
                       headers: dict[str, str] | None = None) -> Timed:
    """Stream one request; content events' arrival times at the client."""
    data = json.dumps({**body, "stream": True}).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    timed = Timed(time.perf_counter())
    async with session.post(url, data=data, headers=headers) as response:
        timed.status, timed.served_by = response.status, response.headers.get("X-DVAI-Served-By")
        buffer = b""
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            buffer += chunk
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                payload = raw[len(b"data: "):]
                if payload == b"[DONE]":
                    continue
                event = json.loads(payload)
                choices = event.get("choices") or [{}]
                text = (choices[0].get("delta") or {}).get("content") or choices[0].get("text")
                if text:
                    timed.tokens += 1
                    timed.arrivals.append(now)
                    timed.first = timed.first or now
                    timed.last = now
    return timed


# --- 1. one hop ------------------------------------------------------------------------


async def hop_rounds(session: aiohttp.ClientSession, peer: NodeProcess, entry: NodeProcess, model: str,
                     rounds: int) -> tuple[list[Timed], list[Timed]]:
    direct: list[Timed] = []
    via: list[Timed] = []
    salts = itertools.count(int(time.time()))
    for index in range(rounds):
        steps = [(direct, peer.base_url, {"X-DVAI-Offload": "never"}), (via, entry.base_url, {})]
        if index % 2:
            steps.reverse()
        for bucket, base_url, headers in steps:
            # A fresh salt at the start of every prompt: llama.cpp's prompt cache must not
            # favour the second request of a round.
            body = {"model": model, "prompt": PROBE_PROMPT.format(salt=next(salts)), "max_tokens": HOP_TOKENS,
                    "temperature": 0}
            bucket.append(await timed_stream(session, base_url + "/completions", body, headers))
            await asyncio.sleep(0.05)  # let each node's after-request work (audit, metrics) finish
    peer_id = await device_id(session, peer)
    assert all(t.served_by == peer_id and t.status == 200 for t in direct + via), "a request was not served by the peer"
    return direct, via


def report_hop(title: str, direct: list[Timed], via: list[Timed]) -> None:
    rate_ratios = [v.rate / d.rate for d, v in zip(direct, via, strict=True) if d.rate and v.rate]
    ttft_extra = [(v.ttft - d.ttft) * 1000 for d, v in zip(direct, via, strict=True)
                  if d.ttft is not None and v.ttft is not None]
    print(f"{title}: {len(direct)} A/B rounds, {HOP_TOKENS} tokens each")
    for name, runs in (("direct ", direct), ("via hop", via)):
        rates = [t.rate for t in runs if t.rate]
        ttfts = [t.ttft * 1000 for t in runs if t.ttft is not None]
        print(f"  {name}  tok/s median {statistics.median(rates):7.2f}   TTFT median {statistics.median(ttfts):7.2f} ms")
    ratio_q, extra_q = statistics.quantiles(rate_ratios, n=4), statistics.quantiles(ttft_extra, n=4)
    print(f"  tok/s via hop ÷ direct (median of round ratios): {statistics.median(rate_ratios):.3f}   target ≥ 0.98"
          f"   (quartiles {ratio_q[0]:.3f} … {ratio_q[2]:.3f})")
    print(f"  extra TTFT per hop (median of round differences): {statistics.median(ttft_extra):+.2f} ms   "
          f"target ≤ 3 ms   (quartiles {extra_q[0]:+.2f} … {extra_q[2]:+.2f} ms)")


async def bench_hop(base: Path, rounds: int) -> None:
    entry_id = device_id_for(base / "entry")
    nodes = start_all({
        # threads = 1 leaves the second core to the entry node and the client: on one machine
        # llama.cpp's threads would otherwise compete with the relay (a real peer is elsewhere).
        "real": (base / "real", node_config("[models.gemma3-270m]\nthreads = 1\n", offload=False,
                                             allow=[entry_id])),
        "sim100": (base / "sim100", node_config(simulated_models({"sim": 100}), offload=False, allow=[entry_id])),
    })
    entry_config = node_config(simulated_models({"gemma3-270m": 1, "sim": 1}), threshold=2,
                               known_peers=[nodes["real"].base_url, nodes["sim100"].base_url])
    nodes |= start_all({"entry": (base / "entry", entry_config)})
    try:
        async with aiohttp.ClientSession() as session:
            await connect(session, nodes["entry"], [nodes["real"], nodes["sim100"]])
            for model, peer in (("gemma3-270m", nodes["real"]), ("sim", nodes["sim100"])):
                await hop_rounds(session, peer, nodes["entry"], model, 2)  # warm-up: verification, caches
            if rounds:
                direct, via = await hop_rounds(session, nodes["real"], nodes["entry"], "gemma3-270m", rounds)
                report_hop("one hop, REAL engine peer (llama.cpp, gemma3-270m, 1 thread)", direct, via)
            direct, via = await hop_rounds(session, nodes["sim100"], nodes["entry"], "sim", max(24, rounds * 2))
            report_hop("one hop, SIMULATED 100 tok/s peer", direct, via)
    finally:
        for node in nodes.values():
            node.stop()


# --- 2. routing under load -----------------------------------------------------------------


class Dispatcher:
    """Client-side baseline: which worker gets the next request."""

    def __init__(self, kind: str, workers: Sequence[NodeProcess]) -> None:
        self.kind = kind
        self.workers = list(workers)
        self.sent = [0] * len(workers)
        self.in_flight = [0] * len(workers)
        self._turn = itertools.cycle(range(len(workers)))

    def pick(self) -> int:
        turn = next(self._turn)
        if self.kind == "round-robin":
            return turn
        order = [(turn + i) % len(self.workers) for i in range(len(self.workers))]  # ties: in turn
        counts = self.sent if self.kind == "least-used" else self.in_flight
        return min(order, key=lambda i: counts[i])


@dataclass
class LoadResult:
    router: str
    throughput_ratio: float
    p50: float
    p95: float
    shares: list[float]


async def run_load(session: aiohttp.ClientSession, router: str, entry: NodeProcess, workers: Sequence[NodeProcess],
                   worker_ids: Sequence[str], *, clients: int, seconds: float, warmup: float) -> LoadResult:
    dispatcher = None if router == "dvai" else Dispatcher(router, workers)
    finished: list[Timed] = []
    running: list[Timed] = []
    start = time.perf_counter()
    stop_at = start + warmup + seconds
    counter = itertools.count()

    async def client() -> None:
        while time.perf_counter() < stop_at:
            body = {"model": "sim", "messages": [{"role": "user", "content": f"request {next(counter)}"}],
                    "max_tokens": LOAD_TOKENS}
            if dispatcher is None:
                url, headers, index = entry.base_url + "/chat/completions", {}, None
            else:
                index = dispatcher.pick()
                dispatcher.sent[index] += 1
                dispatcher.in_flight[index] += 1
                url, headers = workers[index].base_url + "/chat/completions", {"X-DVAI-Offload": "never"}
            probe = Timed(time.perf_counter())
            running.append(probe)
            try:
                timed = await timed_stream(session, url, body, headers)
            finally:
                running.remove(probe)
                if dispatcher is not None and index is not None:
                    dispatcher.in_flight[index] -= 1
            finished.append(timed)

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(warmup + seconds)
    end = time.perf_counter()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    window_start = start + warmup
    tokens = sum(1 for t in finished for a in t.arrivals if window_start <= a <= end)
    throughput = tokens / (end - window_start)
    latencies = [t.last - t.started for t in finished if t.started >= window_start and t.last is not None]
    latencies += [end - t.started for t in running if t.started >= window_start]
    served = [t.served_by for t in finished if t.started >= window_start]
    shares = [served.count(d) / max(1, len(served)) for d in worker_ids]
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    return LoadResult(router, throughput / sum(WORKER_RATES), statistics.median(latencies), quantiles[18], shares)


async def bench_load(base: Path, *, clients: int, seconds: float, warmup: float) -> None:
    entry_id = device_id_for(base / "entry")
    specs = {f"w{rate:g}": (base / f"w{rate:g}", node_config(simulated_models({"sim": rate}), offload=False,
                                                                allow=[entry_id], )) for rate in WORKER_RATES}
    nodes = start_all(specs)
    workers = [nodes[f"w{rate:g}"] for rate in WORKER_RATES]
    entry_config = node_config(simulated_models({"sim": 1}), threshold=5,
                               known_peers=[w.base_url for w in workers])
    nodes |= start_all({"entry": (base / "entry", entry_config)})
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            entry = nodes["entry"]
            await connect(session, entry, workers)
            worker_ids = [await device_id(session, w) for w in workers]
            await timed_stream(session, entry.base_url + "/chat/completions",
                               {"model": "sim", "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2})

            async def all_verified() -> bool:
                status = await offload_status(session, entry.root)
                return sum(1 for p in status["peers"] if p["verified"]) == len(workers)

            await wait_until(all_verified, 15)
            print(f"routing under load: SIMULATED workers at {'/'.join(f'{r:g}' for r in WORKER_RATES)} tok/s "
                  f"(ideal {sum(WORKER_RATES):g} tok/s), {clients} closed-loop clients, {LOAD_TOKENS}-token "
                  f"streams, {seconds:g} s measured after {warmup:g} s warm-up")
            print("  router            thru/ideal    p50 s    p95 s  served shares (10/20/40 tok/s)")
            results = []
            for router in ("dvai", "round-robin", "least-used", "least-in-flight"):
                result = await run_load(session, router, entry, workers, worker_ids, clients=clients,
                                        seconds=seconds, warmup=warmup)
                results.append(result)
                shares = "/".join(f"{s:.2f}" for s in result.shares)
                print(f"  {router:<16}  {result.throughput_ratio:10.3f}  {result.p50:7.2f}  {result.p95:7.2f}  {shares}",
                      flush=True)
                await asyncio.sleep(2)  # let every queue drain before the next router
            dvai = results[0]
            baselines = [r for r in results if r.router in ("round-robin", "least-used")]
            print(f"  dvai throughput ÷ ideal {dvai.throughput_ratio:.3f} (target ≥ 0.9); p95 dvai ÷ "
                  + ", ".join(f"{r.router} {dvai.p95 / r.p95:.2f}" for r in baselines)
                  + " (target < 1 for both)")
    finally:
        for node in nodes.values():
            node.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="A/B rounds of the hop benchmark (real engine)")
    parser.add_argument("--load-seconds", type=float, default=45.0, help="measured seconds per router")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds per router before measuring")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--skip-hop", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        if not args.skip_hop:
            asyncio.run(bench_hop(Path(tmp) / "hop", args.rounds))
        if not args.skip_load:
            asyncio.run(bench_load(Path(tmp) / "load", clients=args.clients, seconds=args.load_seconds,
                                   warmup=args.warmup))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
