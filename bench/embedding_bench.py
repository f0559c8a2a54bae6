"""Batched embeddings against one input per decode, in one run, over HTTP on real nodes.

Two node processes serve the built-in default model in embedding mode with the same
threads and ``ctx_size``: one with ``parallel = 8`` (up to 8 requests share a batch), one with
``parallel = 1`` (one request at a time, as before batching). Each round runs, in turn:

* ``sequential``: 16 requests of one input each, one after another (16 decodes);
* ``batched``: one request of the same 16 inputs (one decode);
* ``concurrent x8``: 8 concurrent requests of 2 inputs, on the ``parallel = 8`` node;
* ``concurrent x8, parallel 1``: the same on the ``parallel = 1`` node (8 decodes, queued).

Fresh inputs every round (a number in each); medians over the rounds of embeddings (inputs)
per second, and the ratios batched ÷ sequential and concurrent ÷ concurrent-at-parallel-1,
plus the decode calls each mode took (``dvai_engine_embedding_decodes_total``) and the node
process's CPU seconds per mode (user + system, from /proc: a measure that holds on a loaded
machine, where wall-clock rates do not).
Usage: python -m bench.embedding_bench [--rounds 5] [--threads 2] [--ctx 512]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import start_node_process  # noqa: E402

WORDS = ("cat", "river", "tax", "law", "mountain", "bread", "quantum", "garden", "engine", "music",
         "winter", "harbour", "violin", "desert", "copper", "lantern")


def inputs(count: int) -> list[str]:
    """Sentences of 8 to 16 words, different every call."""
    return [f"{random.randint(0, 10**6)} " + " ".join(random.choices(WORDS, k=random.randint(8, 16)))
            for _ in range(count)]


async def embed(session: aiohttp.ClientSession, url: str, texts: list[str]) -> None:
    async with session.post(url + "/embeddings", json={"model": "embed", "input": texts}) as response:
        response.raise_for_status()
        body = await response.json()
        assert len(body["data"]) == len(texts)


async def decodes(session: aiohttp.ClientSession, url: str) -> float:
    root = url[: -len("/v1")]
    async with session.get(root + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('dvai_engine_embedding_decodes_total{model="embed"}'):
            return float(line.split()[-1])
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    from node.engine.default_model import default_model_path

    model = default_model_path(progress=False)
    nodes = []
    for parallel in (8, 1):
        config = (f'[models.embed]\npath = "{model}"\nembedding = true\nctx_size = {args.ctx}\n'
                  f"parallel = {parallel}\nthreads = {args.threads}\n")
        nodes.append(start_node_process(Path(tempfile.mkdtemp(prefix="embed-bench-")), config_text=config))
    batching, serial = (node.base_url for node in nodes)
    pids = {batching: nodes[0].process.pid, serial: nodes[1].process.pid}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

            async def sequential() -> None:
                for text in inputs(16):
                    await embed(session, batching, [text])

            async def batched() -> None:
                await embed(session, batching, inputs(16))

            async def concurrent(url: str) -> None:
                await asyncio.gather(*(embed(session, url, inputs(2)) for _ in range(8)))

            modes: dict[str, tuple[str, Callable[[], Awaitable[None]]]] = {
                "sequential (16 requests x 1)": (batching, sequential),
                "batched (1 request x 16)": (batching, batched),
                "concurrent x8 (x 2 inputs)": (batching, lambda: concurrent(batching)),
                "concurrent x8, parallel 1": (serial, lambda: concurrent(serial)),
            }
            await batched()  # warm both nodes
            await concurrent(serial)
            rates: dict[str, list[float]] = {name: [] for name in modes}
            calls: dict[str, list[float]] = {name: [] for name in modes}
            cpu: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(args.rounds):
                for name, (url, run) in modes.items():
                    before = await decodes(session, url)
                    cpu_before = cpu_seconds(pids[url])
                    started = time.perf_counter()
                    await run()
                    rates[name].append(16 / (time.perf_counter() - started))
                    cpu[name].append(cpu_seconds(pids[url]) - cpu_before)
                    calls[name].append(await decodes(session, url) - before)
    finally:
        for node in nodes:
            node.stop()
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"embeddings/s, default model in embedding mode, {args.threads} threads, ctx_size {args.ctx}, "
          f"medians of {args.rounds} interleaved rounds (16 inputs per mode per round)")
    for name in modes:
        print(f"  {name:32s} {median[name]:8.1f} /s   decodes per round: {statistics.median(calls[name]):3.0f}"
              f"   node CPU per round: {statistics.median(cpu[name]):6.2f} s")
    names = list(modes)
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"  batched / sequential:                  {median[names[1]] / median[names[0]]:.2f}x embeddings/s, "
          f"{cpu_median[names[0]] / cpu_median[names[1]]:.2f}x less CPU")
    print(f"  concurrent x8 / same at parallel 1:    {median[names[2]] / median[names[3]]:.2f}x embeddings/s, "
          f"{cpu_median[names[3]] / cpu_median[names[2]]:.2f}x less CPU")


if __name__ == "__main__":
    asyncio.run(main())
