"""The first ten minutes, measured on a real node started as the quick start starts it (issue 15).

Prints: the time from ``dvai-node serve`` to ``ready``; the first chat ("Hello!", no
max_tokens) latency and answer; the default chat model's replies to five varied prompts;
and decode tok/s of the default chat model (smollm2-135m) against Gemma 3 270M, measured
alternately in one run (medians of the rounds).

Usage: python -m bench.default_model_bench [--rounds 3] [--tokens 64]
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

from tests.conftest import start_node_process  # noqa: E402

PROMPTS = (
    "Hello!",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "Translate 'good morning' into Spanish.",
)
COUNTING = "Count upwards: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


async def chat(http: aiohttp.ClientSession, base: str, model: str, text: str) -> tuple[float, dict]:
    started = time.perf_counter()
    async with http.post(f"{base}/chat/completions",
                         json={"model": model, "messages": [{"role": "user", "content": text}]}) as response:
        body = await response.json()
    return time.perf_counter() - started, body


async def decode_rate(http: aiohttp.ClientSession, base: str, model: str, tokens: int, salt: int) -> float:
    """Decode tok/s of one streamed completion: (n − 1) ÷ (last chunk − first chunk)."""
    body = {"model": model, "prompt": f"[{salt}] {COUNTING}", "max_tokens": tokens, "temperature": 0,
            "stream": True}
    times: list[float] = []
    async with http.post(f"{base}/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


async def main(rounds: int, tokens: int) -> None:
    with tempfile.TemporaryDirectory() as state:
        started = time.perf_counter()
        node = start_node_process(Path(state), timeout=300)
        print(f"dvai-node serve → ready: {time.perf_counter() - started:.1f} s")
        try:
            async with aiohttp.ClientSession() as http:
                base = node.base_url
                for index, prompt in enumerate(PROMPTS):
                    elapsed, body = await chat(http, base, "smollm2-135m", prompt)
                    choice = body["choices"][0]
                    label = "first chat" if index == 0 else f"reply {index}"
                    print(f"{label} ({elapsed:.2f} s, {body['usage']['completion_tokens']} tokens, "
                          f"{choice['finish_reason']}): {prompt!r} → {choice['message']['content']!r}")
                await decode_rate(http, base, "gemma3-270m", 4, 0)  # loads Gemma (lazy) outside the timing
                rates: dict[str, list[float]] = {"smollm2-135m": [], "gemma3-270m": []}
                for round_ in range(rounds):
                    for model in (rates if round_ % 2 == 0 else reversed(list(rates))):
                        rates[model].append(await decode_rate(http, base, model, tokens, round_))
                for model, values in rates.items():
                    print(f"{model}: decode {statistics.median(values):.1f} tok/s "
                          f"(median of {len(values)}, {min(values):.1f}-{max(values):.1f})")
                ratio = statistics.median(rates["smollm2-135m"]) / statistics.median(rates["gemma3-270m"])
                print(f"smollm2-135m / gemma3-270m decode: {ratio:.2f}x")
        finally:
            node.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    options = parser.parse_args()
    asyncio.run(main(options.rounds, options.tokens))
