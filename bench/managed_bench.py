"""Managed mode: cold start (spawn → healthy) against warm attach (join a live serve).

Cold starts run on a fresh registry each time, so each spawns a supervisor and a
``dvai-node serve``; warm attaches join the serve the cold start left running.
Rounds interleave cold and warm; medians are printed with their ratio. The SIMULATED
engine isolates the process cost; the real engine adds loading the built-in model.
Also timed: a warm attach through ``dvai-node managed attach``, the path the
JavaScript provider takes (one Python start-up more).

    python -m bench.managed_bench [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from node.managed import ManagedModel
from node.managed.handle import ManagedNode
from node.managed.options import ManagedOptions
from node.managed.registry import Registry, terminate

SIMULATED = {"engine": "simulated", "simulated_tok_per_s": 400.0}


def _clean(registry_dir: Path) -> None:
    registry = Registry(registry_dir)
    for record in registry.records():
        terminate(record.supervisor, grace=2.0)
        terminate(record.serve, grace=2.0)
        registry.remove(record.id)


def _round(model: ManagedModel, label: str) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="managed-bench-") as tmp:
        registry_dir = Path(tmp)
        options = ManagedOptions(models=(model,), registry_dir=registry_dir, idle_timeout=60.0)
        started = time.perf_counter()
        cold = ManagedNode.start(options)
        cold_s = time.perf_counter() - started
        assert cold.spawned, label
        started = time.perf_counter()
        warm = ManagedNode.start(options)
        warm_s = time.perf_counter() - started
        assert not warm.spawned and warm.pid == cold.pid, label
        spec = json.dumps({"models": [{"name": model.name, "config": dict(model.config)}],
                           "registry_dir": str(registry_dir), "idle_timeout": 60.0})
        env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "node", "managed", "attach", "--spec", spec,
                                 "--consumer-pid", str(os.getpid())], capture_output=True, text=True,
                                env=env, check=True)
        cli_s = time.perf_counter() - started
        assert json.loads(result.stdout)["pid"] == cold.pid, label
        warm.close()
        cold.close()
        _clean(registry_dir)
    return cold_s, warm_s, cli_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = [
        ("SIMULATED engine", ManagedModel("GEMMA3_270M", config=SIMULATED), args.rounds),
        ("real engine, GEMMA3_270M", ManagedModel("GEMMA3_270M", config={"ctx_size": 1024}), max(1, args.rounds - 1)),
    ]
    print(f"{'serve':<26} {'cold start (median)':>20} {'warm attach':>12} {'attach via CLI':>15} {'cold/warm':>10}")
    for label, model, rounds in cases:
        samples = [_round(model, label) for _ in range(rounds)]
        cold, warm, cli = (statistics.median(column) for column in zip(*samples, strict=True))
        print(f"{label:<26} {cold * 1000:>17.0f} ms {warm * 1000:>9.1f} ms {cli * 1000:>12.0f} ms "
              f"{cold / warm:>9.0f}x   ({rounds} rounds)", flush=True)


if __name__ == "__main__":
    main()
