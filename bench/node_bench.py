"""Node overhead against in-process llama-cpp-python, on the same GGUF, in one run.

Prints three ratios (targets from issue 2):
  decode tok/s through the node's SSE stream ÷ in-process tok/s   (≥ 0.95)
    (in-process = llama-cpp-python's create_completion stream; the bare Llama.generate loop is
    printed beside it as a stricter baseline)
  node time-to-first-token − in-process time-to-first-token      (≤ 3 ms)
  two concurrent streams' total tok/s ÷ one stream's tok/s       (≥ 0.95)

A and B run alternately, several rounds, and medians are compared, because the
machine is shared and noisy. Usage: python -m bench.node_bench [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import start_node_process  # noqa: E402

PROMPT = "Count upwards: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def prompt_for(round_: int) -> str:
    # A fresh first token each round defeats prefix caching equally on both sides.
    return f"[{random.randint(0, 10**9)}-{round_}] {PROMPT}"


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def in_process(llm, prompt: str, tokens: int) -> tuple[float, float]:  # noqa: ANN001
    started = time.perf_counter()
    times = []
    for _chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0, stream=True):
        times.append(time.perf_counter())
    return times[0] - started, decode_rate(times)


def in_process_raw(llm, prompt: str, tokens: int) -> tuple[float, float]:  # noqa: ANN001
    """The leanest in-process loop: Llama.generate + per-token detokenize, no extras."""
    started = time.perf_counter()
    times = []
    prompt_tokens = llm.tokenize(prompt.encode())
    for token in llm.generate(prompt_tokens, temp=0):
        llm.detokenize([token])
        times.append(time.perf_counter())
        if len(times) >= tokens:
            break
    return times[0] - started, decode_rate(times)


async def node_stream(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    body = {"model": "gemma3-270m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    times = []
    async with session.post(url + "/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    return times[0] - started, decode_rate(times), len(times)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from llama_cpp import Llama

    from node.engine.default_model import default_model_path

    path = default_model_path()
    threads = os.cpu_count() or 1
    llm = Llama(model_path=str(path), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=99, verbose=False)
    # the same model and thread count on both sides (built-in models default to one thread)
    node = start_node_process(Path(tempfile.mkdtemp()) / "bench-node", config_text=(
        f'[models.gemma3-270m]\npath = "{path}"\nthreads = {threads}\nctx_size = 4096\n'))
    ttft_a, ttft_b, rate_a, rate_b, one, two = [], [], [], [], [], []
    ttft_raw, rate_raw = [], []
    try:
        async with aiohttp.ClientSession() as session:
            await node_stream(session, node.base_url, prompt_for(-1), 8)  # warm up both
            in_process(llm, prompt_for(-1), 8)
            for round_ in range(args.rounds):
                t, r = in_process(llm, prompt_for(round_), args.tokens)
                ttft_a.append(t)
                rate_a.append(r)
                t, r = in_process_raw(llm, prompt_for(round_), args.tokens)
                ttft_raw.append(t)
                rate_raw.append(r)
                t, r, _ = await node_stream(session, node.base_url, prompt_for(round_), args.tokens)
                ttft_b.append(t)
                rate_b.append(r)
                started = time.perf_counter()
                _, _, n = await node_stream(session, node.base_url, prompt_for(round_), args.tokens)
                one.append(n / (time.perf_counter() - started))
                started = time.perf_counter()
                results = await asyncio.gather(
                    node_stream(session, node.base_url, prompt_for(round_) + " A", args.tokens),
                    node_stream(session, node.base_url, prompt_for(round_) + " B", args.tokens),
                )
                two.append(sum(n for _, _, n in results) / (time.perf_counter() - started))
    finally:
        node.stop()
        llm.close()
    med = statistics.median
    print(f"tokens per run: {args.tokens}, rounds: {args.rounds}, threads: {threads}")
    print(f"in-process decode      {med(rate_a):8.1f} tok/s   ttft {med(ttft_a) * 1000:7.1f} ms")
    print(f"in-process raw loop    {med(rate_raw):8.1f} tok/s   ttft {med(ttft_raw) * 1000:7.1f} ms"
          "   (Llama.generate, no create_completion extras)")
    print(f"node (HTTP SSE) decode {med(rate_b):8.1f} tok/s   ttft {med(ttft_b) * 1000:7.1f} ms")
    print(f"decode ratio node/in-process:   {med(rate_b) / med(rate_a):.3f}   (target >= 0.95)")
    print(f"ttft node - in-process:         {(med(ttft_b) - med(ttft_a)) * 1000:+.2f} ms (target <= 3 ms)")
    print(f"decode ratio node/raw loop:     {med(rate_b) / med(rate_raw):.3f}")
    print(f"ttft node - raw loop:           {(med(ttft_b) - med(ttft_raw)) * 1000:+.2f} ms")
    print(f"two streams total / one stream: {med(two) / med(one):.3f}   (target >= 0.95; "
          f"one {med(one):.1f} tok/s, two {med(two):.1f} tok/s)")


if __name__ == "__main__":
    asyncio.run(main())
