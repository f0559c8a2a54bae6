"""Grammar-constrained decoding vs unconstrained, on the real engine and the default model.

The same chat prompt is generated A/B interleaved (order alternating per round): A without a
grammar, B with the grammar of a JSON schema (``node.engine.grammar``) long enough not to
finish within the token budget. Both stop at the same token count (A with ``ignore_eos``).
Printed: medians of decode tok/s and time to first token, and the median of the per-round
ratios constrained ÷ unconstrained (decode target ≥ 0.85).

    .venv/bin/python -m bench.grammar_bench [--rounds 8] [--tokens 96] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.engine.base import ChatMessage, ModelInfo, SamplingParams  # noqa: E402
from node.engine.default_model import default_model_path  # noqa: E402
from node.engine.grammar import schema_to_grammar  # noqa: E402
from node.engine.llama import LlamaEngine  # noqa: E402

SCHEMA = {
    "type": "array", "minItems": 40, "maxItems": 40,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "colour": {"enum": ["red", "green", "blue"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["name", "age", "colour", "score"],
    },
}


def run(engine: LlamaEngine, prompt: str, params: SamplingParams) -> tuple[float, float]:
    """(time to first token in ms, decode tok/s) of one generation."""
    started = time.perf_counter()
    outcome = engine.generate(prompt, params, lambda _text: None, threading.Event())
    assert outcome.first_token_at is not None and outcome.last_token_at is not None
    span = outcome.last_token_at - outcome.first_token_at
    return (outcome.first_token_at - started) * 1000, (outcome.completion_tokens - 1) / span


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    args = parser.parse_args(argv)
    path = default_model_path()
    engine = LlamaEngine(ModelInfo(id="bench", path=str(path), ctx_size=2048, embedding=False), threads=args.threads)
    engine.load()
    try:
        prompt, _ = engine.render_chat([ChatMessage("user", "List forty people as JSON.")])
        grammar = schema_to_grammar(SCHEMA)
        free = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=1, ignore_eos=True)
        constrained = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=1, grammar=grammar)
        run(engine, prompt, free)  # warm-up: load pages, fill caches
        run(engine, prompt, constrained)
        rows: dict[str, list[tuple[float, float]]] = {"free": [], "grammar": []}
        for index in range(args.rounds):
            order = ("free", "grammar") if index % 2 == 0 else ("grammar", "free")
            for name in order:
                rows[name].append(run(engine, prompt, free if name == "free" else constrained))
    finally:
        engine.close()
    print(f"grammar-constrained vs unconstrained, {args.tokens} tokens, {args.rounds} rounds interleaved")
    for name, values in rows.items():
        print(f"  {name:8s} decode median {statistics.median(v[1] for v in values):7.2f} tok/s   "
              f"TTFT median {statistics.median(v[0] for v in values):7.2f} ms")
    decode = statistics.median(g[1] / f[1] for f, g in zip(rows["free"], rows["grammar"], strict=True))
    ttft = statistics.median(g[0] / f[0] for f, g in zip(rows["free"], rows["grammar"], strict=True))
    print(f"  decode tok/s constrained ÷ unconstrained (median of round ratios): {decode:.3f}   target ≥ 0.85")
    print(f"  TTFT constrained ÷ unconstrained (median of round ratios): {ttft:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
