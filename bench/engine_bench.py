"""The node's multi-sequence engine against llama.cpp's own llama-server, in one run.

Same GGUF (the built-in default model), same threads, same ``--parallel`` and
context per sequence; streamed 128-token completions at concurrency 1, 2, 4 and
8, node and llama-server alternating level by level, several rounds, medians.

Prints per level: aggregate tok/s of each and the ratio node ÷ llama-server
(target ≥ 0.95), TTFT p50/p95 of each, streams completed; then aggregate at 4 ÷
single for the node (target ≥ 1.4) and both processes' RSS.

llama-server is built once from the llama.cpp source vendored in the pinned
llama-cpp-python sdist (bench/llama_server_build.py; slow the first time).
Usage: python -m bench.engine_bench [--rounds 3] [--tokens 128] [--threads 2] [--parallel 4] [--node-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.llama_server_build import build  # noqa: E402
from tests.conftest import free_port, start_node_process  # noqa: E402

PROMPT = "Count upwards: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
LEVELS = (1, 2, 4, 8)


def prompt_for() -> str:
    # A fresh first token for every stream: no prompt cache helps either side.
    return f"[{random.randint(0, 10**9)}] {PROMPT}"


async def stream(session: aiohttp.ClientSession, url: str, model: str, tokens: int,
                 extra: dict[str, object]) -> tuple[float, int, float]:
    """One streamed completion: (TTFT s, completion tokens, end time)."""
    body = {"model": model, "prompt": prompt_for(), "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    async with session.post(url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = int(chunk["usage"]["completion_tokens"])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - started, usage_tokens if usage_tokens is not None else chunks, end


async def level(url: str, model: str, concurrency: int, tokens: int,
                extra: dict[str, object]) -> tuple[float, list[float], int]:
    """(aggregate tok/s, TTFTs, streams that produced all their tokens)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream(session, url, model, tokens, extra) for _ in range(concurrency)))
    total = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results) - started
    return total / elapsed, [r[0] for r in results], sum(1 for r in results if r[1] >= tokens)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("llama-server exited during start-up")
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("llama-server did not become ready")


def start_llama_server(binary: Path, model: Path, port: int, threads: int, parallel: int,
                       ctx: int) -> subprocess.Popen[bytes]:
    """llama-server with the node's settings: same threads, seats, context per seat and batch."""
    return subprocess.Popen(
        [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
         "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-kvu",
         "-c", str(ctx * parallel), "-b", "512", "-ub", "512", "--no-webui", "-ngl", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    parser.add_argument("--node-only", action="store_true",
                        help="skip llama-server (when it is not built yet): the node's own scaling only")
    args = parser.parse_args()

    from node.engine.default_model import default_model_path

    model = default_model_path(progress=False)
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    server = None if args.node_only else start_llama_server(
        build(), model, port, args.threads, args.parallel, args.ctx)
    state = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    # generation_timeout: on a loaded machine a 128-token stream may take longer than the default
    # 60 s; cut short, it would count as incomplete rather than slow.
    config = (f"generation_timeout = 600\n[models.gemma3-270m]\nparallel = {args.parallel}\nctx_size = {args.ctx}\n"
              f"threads = {args.threads}\nqueue_depth = 16\n")
    node = start_node_process(state, config_text=config)
    try:
        if server is not None:
            await wait_ready(server_url, server)
        node_url = node.root
        node_extra: dict[str, object] = {}
        server_extra: dict[str, object] = {}
        # warm-up: first-use costs on both sides
        await level(node_url, "gemma3-270m", 1, 8, node_extra)
        if server is not None:
            await level(server_url, "gemma3-270m", 1, 8, server_extra)
        rates: dict[tuple[str, int], list[float]] = {}
        ttfts: dict[tuple[str, int], list[float]] = {}
        complete: dict[tuple[str, int], list[int]] = {}
        for round_ in range(args.rounds):
            for concurrency in LEVELS:
                sides = [("node", node_url, node_extra)]
                if server is not None:
                    sides.append(("llama-server", server_url, server_extra))
                if round_ % 2:
                    sides.reverse()
                for name, url, extra in sides:
                    rate, times, done = await level(url, "gemma3-270m", concurrency, args.tokens, extra)
                    rates.setdefault((name, concurrency), []).append(rate)
                    ttfts.setdefault((name, concurrency), []).extend(times)
                    complete.setdefault((name, concurrency), []).append(done)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        print(f"\nmodel {model.name}, threads {args.threads}, parallel {args.parallel}, "
              f"{args.tokens}-token streamed completions, medians of {args.rounds} interleaved rounds")
        if server is None:
            print("conc | node tok/s | node TTFT p50/p95 ms | complete")
            for concurrency in LEVELS:
                nt = ttfts[("node", concurrency)]
                print(f"{concurrency:4d} | {statistics.median(rates[('node', concurrency)]):10.1f} | "
                      f"{percentile(nt, .5) * 1000:7.0f} / {percentile(nt, .95) * 1000:7.0f} | "
                      f"{sum(complete[('node', concurrency)])}/{concurrency * args.rounds}")
            single = statistics.median(rates[("node", 1)])
            print(f"node aggregate@4 ÷ single: {statistics.median(rates[('node', 4)]) / single:.2f}; "
                  f"RSS: node {rss_mib(node.process.pid):.0f} MiB")
            return
        print("conc | node tok/s | server tok/s | ratio | node TTFT p50/p95 ms | server TTFT p50/p95 ms | complete")
        for concurrency in LEVELS:
            node_rate = statistics.median(rates[("node", concurrency)])
            server_rate = statistics.median(rates[("llama-server", concurrency)])
            nt, st = ttfts[("node", concurrency)], ttfts[("llama-server", concurrency)]
            done_node = sum(complete[("node", concurrency)])
            done_server = sum(complete[("llama-server", concurrency)])
            streams = concurrency * args.rounds
            print(f"{concurrency:4d} | {node_rate:10.1f} | {server_rate:12.1f} | {node_rate / server_rate:5.2f} | "
                  f"{percentile(nt, .5) * 1000:7.0f} / {percentile(nt, .95) * 1000:7.0f}    | "
                  f"{percentile(st, .5) * 1000:7.0f} / {percentile(st, .95) * 1000:7.0f}      | "
                  f"node {done_node}/{streams}, server {done_server}/{streams}")
        single = statistics.median(rates[("node", 1)])
        four = statistics.median(rates[("node", 4)])
        print(f"node aggregate@4 ÷ single: {four / single:.2f} (target ≥ 1.4); llama-server: "
              f"{statistics.median(rates[('llama-server', 4)]) / statistics.median(rates[('llama-server', 1)]):.2f}")
        print(f"RSS: node {rss_mib(node.process.pid):.0f} MiB, llama-server {rss_mib(server.pid):.0f} MiB")
    finally:
        node.stop()
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    asyncio.run(main())
