"""Is a 50-token probe a fair stand-in for a long generation? (issue 3: within ±7 %)

On one loaded model, alternately: a 50-token probe and a 256-token measurement (the
same probe code, end of sequence suppressed, timed (n − 1) ÷ (last − first)), five
rounds each, then the medians and their ratio. Also prints the heuristic estimate
(model size, threads, copy bandwidth) beside the probe, and the load average, because
the machine may be shared and a busy neighbour moves every figure.

Usage: python -m bench.probe_bench [--rounds 5] [--short 50] [--long 256] [--threads N] [--model GGUF]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.capability import heuristic_tok_per_s, measure_copy_bandwidth, probe  # noqa: E402
from node.config import ModelConfig, NodeConfig  # noqa: E402
from node.engine.registry import ModelRegistry  # noqa: E402

TARGET = 0.07


async def run(args: argparse.Namespace) -> int:
    model = ModelConfig(id="bench", path=args.model, threads=args.threads, ctx_size=1024)
    registry = ModelRegistry.from_config(NodeConfig(models=(model,)))
    slot = registry.resolve("bench")
    threads = args.threads or os.cpu_count() or 1
    try:
        await slot.ensure_loaded()
        short: list[float] = []
        long: list[float] = []
        for round_ in range(args.rounds):
            for tokens, figures in ((args.short, short), (args.long, long)):
                score = await probe(slot, tokens, time_limit=600)
                assert score.samples == tokens, score
                figures.append(score.tok_per_s)
            print(f"round {round_ + 1}: {args.short}-token probe {short[-1]:6.1f} tok/s   "
                  f"{args.long}-token {long[-1]:6.1f} tok/s", flush=True)
        bandwidth = await asyncio.to_thread(measure_copy_bandwidth)
    finally:
        await registry.stop()
    short_median, long_median = statistics.median(short), statistics.median(long)
    ratio = short_median / long_median
    heuristic = heuristic_tok_per_s(slot.info.size_bytes, threads, bandwidth or 0.0)
    print(f"model {slot.info.path} ({slot.info.size_bytes / 1e6:.0f} MB), {threads} threads, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"median {args.short}-token probe: {short_median:.1f} tok/s (spread {min(short):.1f}-{max(short):.1f})")
    print(f"median {args.long}-token run:   {long_median:.1f} tok/s (spread {min(long):.1f}-{max(long):.1f})")
    verdict = "within" if abs(ratio - 1) <= TARGET else "OUTSIDE"
    print(f"ratio probe/long: {ratio:.3f} ({(ratio - 1) * 100:+.1f} %, {verdict} the ±{TARGET:.0%} target)")
    if heuristic is not None and bandwidth:
        print(f"heuristic: {heuristic:.1f} tok/s from {bandwidth / 1e9:.1f} GB/s copy bandwidth "
              f"(heuristic/probe {heuristic / short_median:.2f})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the built-in model)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
