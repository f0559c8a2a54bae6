"""Run every benchmark in turn: python -m bench."""

import runpy
import sys

for name in ("bench.node_bench", "bench.offload_bench"):
    print(f"== {name}", flush=True)
    sys.argv = [name]
    runpy.run_module(name, run_name="__main__")
