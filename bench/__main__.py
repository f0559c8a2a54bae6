"""Run every benchmark in turn: python -m bench."""

import runpy
import sys

BENCHMARKS = (
    "bench.node_bench",  # issue 2: node overhead vs in-process llama-cpp-python
    "bench.probe_bench",  # issue 3: 50-token probe vs 256-token measurement
    "bench.discovery_bench",  # issue 3: join / leave / crash detection times
    "bench.offload_bench",  # issue 5: one hop vs direct, router vs baselines on real nodes
    "bench.mesh_sim",  # issue 5: SIMULATED mesh, router vs baselines on a virtual clock
    "bench.rendezvous_bench",  # issue 6: pairings per second, memory per idle session
    "bench.hub_bench",  # issue 13: what API keys, signatures and quotas add per request
    "bench.engine_bench",  # issue 11: continuous batching vs llama-server at concurrency 1-8
    "bench.embedding_bench",  # issue 11: embeddings batched vs one input per decode
    "bench.default_model_bench",  # issue 15: first chat, default model replies, decode vs Gemma
    "bench.link_bench",  # issue 10: data channel vs LAN HTTP hop, bulk MB/s, link set-up times
    "bench.grammar_bench",  # issue 12: grammar-constrained vs unconstrained decoding
    "bench.managed_bench",  # issue 14: managed serve cold start vs warm attach
)

for name in BENCHMARKS:
    print(f"== {name}", flush=True)
    sys.argv = [name]
    runpy.run_module(name, run_name="__main__")
